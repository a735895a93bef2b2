"""``prima.io.load_study`` against the ``dcm2niix`` command on the same DICOM folders, side by side.

Writes (once, into ``--work`` or a temporary folder) a synthetic study of ``--series`` series of
``--slices`` single-frame files each (``prima.io.write_dicom_series``, ``--matrix`` squared, planes
cycling axial / sagittal / coronal), plus the fixtures the I/O tests use for the other DICOM layouts:
two enhanced multi-frame objects (``tests/helpers/enhanced.py``) and nibabel's Philips enhanced MPRAGE
(``enhanced``), nibabel's two Siemens DWI mosaics (``mosaic``; real headers, noise for pixels). Rows: each
of the three folders, then ``all``, their parent folder loaded as one study.

For each folder it alternates, ``--runs`` times after one untimed warm-up of each (files in the page
cache), a ``load_study(folder)`` call in this process and one ``dcm2niix`` run (the flags of
``tests/helpers/dcm2niix.py``, writing uncompressed NIfTI into a fresh folder), and prints medians and
the median of the per-run ratios load_study / dcm2niix (target <= 1.0): of wall time, and of CPU time
(user + system; every thread of this process for load_study, the child for dcm2niix), which a busy
neighbour on a shared machine disturbs less. Both tools run in the same seconds, so load hits both
alike. ``--threads 1 2`` repeats the rows with that many series decoded at once by load_study.

    python benchmarks/bench_load_dicom.py [--series 8] [--slices 256] [--matrix 256] [--runs 5] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from helpers.dcm2niix import DCM2NIIX, FLAGS  # noqa: E402
from helpers.enhanced import write_enhanced_mr  # noqa: E402
from helpers.studies import vendor_sample_with_pixels  # noqa: E402
from prima.io import load_study, write_dicom_series  # noqa: E402
from prima.io import study as study_module  # noqa: E402

PLANES = ((2, "AX"), (0, "SAG"), (1, "COR"))  # (through axis of the RAS grid, name)
_COS, _SIN = np.cos(np.deg2rad(20.0)), np.sin(np.deg2rad(20.0))
ENHANCED = (("enhanced_axial", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)),
            ("enhanced_oblique", (_COS, -_SIN, 0.0, _SIN, _COS, 0.0)))
PHILIPS = "philips_mprage.dcm.gz"  # nibabel's Philips enhanced MPRAGE (real functional groups)
MOSAICS = ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")


def write_synthetic(folder: Path, series: int, slices: int, matrix: int) -> int:
    """``series`` series of ``slices`` files each, ``matrix`` x ``matrix`` pixels; returns the file count."""
    rng = np.random.default_rng(0)
    for index in range(series):
        through_axis, plane = PLANES[index % len(PLANES)]
        shape = [matrix, matrix, matrix]
        shape[through_axis] = slices
        spacing = [0.9, 0.9, 0.9]
        spacing[through_axis] = 1.0 + 0.5 * (index % 3)
        affine = np.diag([*spacing, 1.0])
        affine[:3, 3] = -np.array(spacing) * (np.array(shape) - 1) / 2
        volume = rng.integers(0, 4000, size=shape, dtype=np.uint16)
        write_dicom_series(volume, affine, folder / f"{index:02d}_{plane}", series_description=f"{plane} {index}",
                           study_description="BENCH", series_number=index + 1, study_uid="1.2.826.0.1.3680043.8.498.1",
                           through_axis=through_axis, uid_seed=f"bench-{index}")
    return series * slices


def write_enhanced(folder: Path) -> None:
    stored = np.random.default_rng(2).integers(0, 400, size=(48, 192, 160)).astype(np.uint16)
    for name, orientation in ENHANCED:
        (folder / name).mkdir(parents=True)
        write_enhanced_mr(stored, (3.0, 0.9, 0.9), np.zeros(3), folder / name / "enhanced.dcm", orientation=orientation)
    vendor_sample_with_pixels(folder / "philips_mprage", PHILIPS)


def write_mosaics(folder: Path) -> None:
    for name in MOSAICS:
        vendor_sample_with_pixels(folder / name.split(".")[0], name)


def build(work: Path, series: int, slices: int, matrix: int) -> dict[str, Path]:
    """The folders timed, by row name (the three, then their parent: one study of every series); written
    unless ``work`` already holds them."""
    tag = f"synthetic_{series}x{slices}_{matrix}"
    folders = {tag: work / "all" / tag, "enhanced": work / "all" / "enhanced", "mosaic": work / "all" / "mosaic"}
    writers = {tag: lambda f: write_synthetic(f, series, slices, matrix), "enhanced": write_enhanced,
               "mosaic": write_mosaics}
    for stale in (work / "all").glob("synthetic_*"):
        if stale != folders[tag]:  # another size from an earlier run: not part of this one's "all"
            shutil.rmtree(stale)
    for name, folder in folders.items():
        if not folder.exists():
            staging = work / f"{folder.name}.partial"
            shutil.rmtree(staging, ignore_errors=True)
            writers[name](staging)
            folder.parent.mkdir(exist_ok=True)
            staging.rename(folder)
    return {**folders, "all": work / "all"}


def run_dcm2niix(folder: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    done = subprocess.run([DCM2NIIX, *FLAGS, "-o", str(out), str(folder)], capture_output=True, text=True)
    if done.returncode != 0 or not any(out.glob("*.nii")):
        raise SystemExit(f"dcm2niix failed on {folder} ({done.returncode}):\n{done.stdout}{done.stderr}")


@dataclass
class Timings:
    """Per run: wall seconds and CPU seconds (user, system) of each tool."""

    prima_s: list[float] = field(default_factory=list)
    oracle_s: list[float] = field(default_factory=list)
    prima_cpu: list[tuple[float, float]] = field(default_factory=list)
    oracle_cpu: list[tuple[float, float]] = field(default_factory=list)

    def ratio(self) -> float:
        return statistics.median(p / o for p, o in zip(self.prima_s, self.oracle_s))

    def cpu_ratio(self) -> float:
        return statistics.median(sum(p) / sum(o) for p, o in zip(self.prima_cpu, self.oracle_cpu))

    @staticmethod
    def cpu(runs: list[tuple[float, float]]) -> str:
        """Median user + median system seconds."""
        return f"{statistics.median(u for u, _ in runs):.3f}+{statistics.median(s for _, s in runs):.3f} s"


def _cpu(who: int) -> tuple[float, float]:
    usage = resource.getrusage(who)
    return usage.ru_utime, usage.ru_stime


def _since(who: int, before: tuple[float, float]) -> tuple[float, float]:
    now = _cpu(who)
    return now[0] - before[0], now[1] - before[1]


def side_by_side(folder: Path, out: Path, runs: int) -> tuple[Timings, int, int]:
    """Both tools on ``folder``, alternating, after one untimed call of each; also the series prima
    loaded and the files in the folder. CPU time: this process (every thread) for load_study, the child
    for dcm2niix, so a neighbour's load on the machine counts against neither."""
    study = load_study(folder)
    n_series = len(study.series)
    del study
    run_dcm2niix(folder, out)
    timings = Timings()
    for _ in range(runs):
        cpu, started = _cpu(resource.RUSAGE_SELF), time.perf_counter()
        study = load_study(folder)
        timings.prima_s.append(time.perf_counter() - started)
        timings.prima_cpu.append(_since(resource.RUSAGE_SELF, cpu))
        del study
        cpu, started = _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
        run_dcm2niix(folder, out)
        timings.oracle_s.append(time.perf_counter() - started)
        timings.oracle_cpu.append(_since(resource.RUSAGE_CHILDREN, cpu))
    return timings, n_series, sum(1 for p in folder.rglob("*") if p.is_file())


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8, help="series in the synthetic study")
    parser.add_argument("--slices", type=int, default=256, help="files (slices) per synthetic series")
    parser.add_argument("--matrix", type=int, default=256, help="rows = columns of the synthetic images")
    parser.add_argument("--runs", type=int, default=5, help="timed calls of each tool per folder (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="series decoded at once by load_study (prima.io.study.LOAD_THREADS), one set of rows "
                             "per value (default: the library's choice)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder to keep the written studies in between runs (default: a temporary one)")
    args = parser.parse_args()
    if DCM2NIIX is None:
        raise SystemExit("dcm2niix not found; pip install -r requirements-test.txt")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp) / "studies"
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        folders = build(work, args.series, args.slices, args.matrix)
        print(f"studies ready in {time.perf_counter() - started:.1f} s under {work}")
        print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; dcm2niix {DCM2NIIX}; {args.runs} runs each, "
              f"alternating, medians")
        print(f"{'folder':20s} {'threads':>7s} {'files':>5s} {'series':>6s} {'load_study':>10s} {'dcm2niix':>9s} "
              f"{'ratio':>6s} {'cpu load_study':>15s} {'cpu dcm2niix':>13s} {'cpu ratio':>9s}")
        ratios = {}
        for threads in args.threads or [getattr(study_module, "LOAD_THREADS", 1)]:
            study_module.LOAD_THREADS = threads
            for name, folder in folders.items():
                timings, n_series, n_files = side_by_side(folder, Path(tmp) / "nifti", args.runs)
                ratios[f"{name}/{threads}"] = timings.ratio()
                print(f"{name:20s} {threads:7d} {n_files:5d} {n_series:6d} {statistics.median(timings.prima_s):8.3f} s "
                      f"{statistics.median(timings.oracle_s):7.3f} s {timings.ratio():5.2f}x "
                      f"{Timings.cpu(timings.prima_cpu):>15s} {Timings.cpu(timings.oracle_cpu):>13s} "
                      f"{timings.cpu_ratio():8.2f}x")
        print("cpu = median user + median system seconds (this process's threads for load_study, the child for "
              "dcm2niix)")
        print("ratio = median over runs of load_study / dcm2niix wall time (target <= 1.0); folder/threads: "
              + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
