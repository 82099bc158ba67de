"""`minigpt plots`: the DVC-declared curves of the workspace and chosen experiments, offline.

    minigpt plots [--exp NAME ...] [--out DIR]   ->  DIR/<plot>.png + DIR/index.html

Design choices
- DVC decides what is drawn: the data and the Vega-Lite specs come from `dvc plots diff --json
  workspace EXP ...` (or `dvc plots show --json` without --exp), i.e. the top-level `plots:` of
  dvc.yaml with DVC's own templates, one line per (revision, file, field). Nothing is re-implemented
  here but the rendering; experiment names are ordinary DVC revisions.
- `dvc plots show` writes an HTML page that loads vega from a CDN, so it is blank offline. Here the
  specs are rendered by `vl-convert-python` (Vega's own renderer, bundled in a native library, no
  browser, no network): PNG files for reports and SVG inlined in one HTML page with no script and no
  external reference, so it draws anywhere, offline, as soon as it is opened.
- Errors are one line (`PlotsError`): dvc missing or failing (its last line), an unknown
  experiment, nothing to plot, vl-convert not installed (`pip install "minigpt[plots]"`).
- What is not drawn is said (`dropped`, one `warning:` line each): a curve DVC could not load (a
  missing file, a missing column: its `errors`) and values that are not numbers (an empty cell,
  `nan`), which Vega skips without a word.
"""

from __future__ import annotations

import html
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence


class PlotsError(RuntimeError):
    """The plots cannot be made; the message is one line."""


def dropped(out: dict) -> list[str]:
    """One line per curve, or part of one, that `dvc plots --json` output `out` will not draw."""
    notes = [f"{e.get('name', '?')}: {e.get('rev', '?')}: {e.get('source') or 'a curve'} not drawn "
             f"({' '.join(str(e.get('msg') or e.get('type', '?')).split())})"
             for e in out.get("errors") or []]
    for name, renders in (out.get("data") or {}).items():
        for r in renders:
            spec = r.get("content") if r.get("type") == "vega" else None
            x = (((spec or {}).get("encoding") or {}).get("x") or {}).get("field")
            bad: dict[tuple, list] = {}
            for row in ((spec or {}).get("data") or {}).get("values") or []:
                curve = (row.get("rev", "?"), row.get("filename::field", "?"))
                counts = bad.setdefault(curve, [0, []])
                counts[0] += 1
                for value in (row.get("dvc_inferred_y_value"), row.get(x) if x else 0):
                    if not _number(value):
                        counts[1].append(value)
                        break
            for (rev, curve), (n, values) in bad.items():
                if values:
                    shown = ", ".join(repr(v) for v in dict.fromkeys(map(str, values)))
                    notes.append(f"{name}: {rev}: {curve}: {len(values)} of {n} points not drawn "
                                 f"(not numbers: {shown:.80})")
    return notes


def _number(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def dvc_plots(exps: Sequence[str], cwd: str | Path = ".",
              notes: list[str] | None = None) -> dict[str, list[dict]]:
    """{plot id: [vega-lite spec with its data inlined]} from `dvc plots ... --json`; `notes`,
    when given, receives what will not be drawn (`dropped`)."""
    args = ["diff", "--json", "workspace", *exps] if exps else ["show", "--json"]
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", *args], cwd=cwd,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("ERROR: ")
        raise PlotsError(f"dvc plots {' '.join(args[2:] or args[:1])}: {last}")
    try:
        out = json.loads(proc.stdout or "{}")
    except ValueError as e:
        raise PlotsError(f"dvc plots --json: unreadable output ({e})") from None
    errors = out.get("errors") or []
    if exps and errors:  # an unknown experiment/revision is reported here, not by the exit status
        bad = sorted({e.get("rev", "?") for e in errors if e.get("rev") in exps})
        if bad:
            raise PlotsError(f"--exp {bad[0]}: no such experiment or revision (see `dvc exp show`)")
    if notes is not None:
        notes += dropped(out)
    specs = {name: [r["content"] for r in renders if r.get("type") == "vega"]
             for name, renders in (out.get("data") or {}).items()}
    specs = {name: s for name, s in specs.items() if s}
    if not specs:
        other = [e for e in errors if e.get("type") != "FileNotFoundError"]
        if other:  # the files are there but unusable: say why rather than "run dvc repro"
            raise PlotsError(f"nothing to plot: {dropped({'errors': other})[0]}")
        raise PlotsError("nothing to plot: no curves in the workspace yet (run `dvc repro`)")
    return specs


def _file_name(plot_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", plot_id).strip("._") or "plot"


def render(specs: dict[str, list[dict]], out_dir: str | Path, title: str) -> list[Path]:
    """Write <plot>.png (2x) per spec and index.html with every plot as inline SVG; -> files."""
    try:
        import vl_convert as vlc
    except ImportError:
        raise PlotsError('vl-convert-python is not installed: pip install "minigpt[plots]"') from None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, sections = [], []
    for plot_id, plot_specs in specs.items():
        for i, spec in enumerate(plot_specs):
            name = _file_name(plot_id) + (f"-{i}" if len(plot_specs) > 1 else "")
            png = out_dir / f"{name}.png"
            png.write_bytes(vlc.vegalite_to_png(spec, scale=2))
            written.append(png)
            svg = vlc.vegalite_to_svg(spec)
            sections.append(f'<section id="{html.escape(name)}"><h2>{html.escape(plot_id)}</h2>\n'
                            f'{svg}\n</section>')
    page = out_dir / "index.html"
    page.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>\n<style>body{{font-family:sans-serif;margin:2em}}"
        "section{margin-bottom:2em}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body></html>\n",
        encoding="utf-8")
    written.append(page)
    return written


def make_plots(exps: Sequence[str], out_dir: str | Path, cwd: str | Path = ".",
               notes: list[str] | None = None) -> list[Path]:
    title = "minigpt: " + ", ".join(["workspace", *exps])
    return render(dvc_plots(exps, cwd, notes), out_dir, title)
