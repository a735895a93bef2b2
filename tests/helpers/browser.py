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
