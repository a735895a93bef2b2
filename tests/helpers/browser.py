"""Browser instrumentation shared by the browser tests and benchmarks/bench_app.py."""

# Records, in the page's own clock, the time from a mouse press to the viewer's image changing.
WATCH_VIEWER_JS = """() => {
  window.__sliceMs = [];
  window.__lastHref = document.querySelector('#viewer image').getAttribute('href');
  new MutationObserver(() => {
    const href = document.querySelector('#viewer image').getAttribute('href');
    if (href !== window.__lastHref) { window.__lastHref = href; window.__sliceMs.push(performance.now() - window.__down); }
  }).observe(document.querySelector('#viewer'), {attributes: true, subtree: true, childList: true});
  document.addEventListener('mousedown', () => { window.__down = performance.now(); }, true);
}"""


def click_slider(page, box: dict, fraction: float, slices_shown: int, timeout_ms: int = 15_000) -> None:
    """Click the viewer's slider rail at ``fraction`` of its width and wait until the viewer has shown
    ``slices_shown`` new slices since ``WATCH_VIEWER_JS`` (a busy machine may take longer than any fixed wait)."""
    page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)
    page.wait_for_function(f"window.__sliceMs.length >= {slices_shown}", timeout=timeout_ms)
