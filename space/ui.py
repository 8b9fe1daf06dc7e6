"""The Gradio Blocks of the demo: drop a picture, see where people look.

    demo = build_demo(ModelStore(ModelSpec("me/saliency-unet")))
    launch(demo, host="127.0.0.1", port=7860)

The model runs once per upload; the map is kept in a `gr.State`, and every display control
(colormap, opacity, blur, number of peak regions) only re-renders from it. Handlers receive the
raw upload payload (`preprocess=False`) so that every file, however strange, is decoded by the
project's one image reader (`hub.preprocess.load_image`, via `serving.read_upload`) and any
failure becomes one `gr.Error` sentence.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from hub import analysis
from hub.analysis import AoiShare, AttentionStats, Box, attention_stats
from hub.card import SOURCE_URL
from hub.preprocess import COLORMAPS, map_to_image
from space import render, serving
from space.serving import ModelLoadError, ModelStore, UploadError

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).parent / "examples"
# The colormaps offered: all of hub.preprocess.COLORMAPS, the most useful first.
_PREFERRED = ("turbo", "jet", "inferno", "viridis", "hot")
COLORMAP_CHOICES = [c for c in _PREFERRED if c in COLORMAPS] + [c for c in COLORMAPS if c not in _PREFERRED]

TITLE = "Where do people look?"
INTRO = (
    "Drop a photo (or paste one, or use the webcam) and a ResNet50 U-Net trained on eye-tracking data "
    "predicts where people's eyes go in the first seconds of viewing. Uploads and results are kept "
    "on this server only temporarily and are never shared."
)
CSS = """
.gradio-container {max-width: 1280px !important; margin: 0 auto;}
#status p {margin: 0;}
#stats table {font-variant-numeric: tabular-nums;}
#compare-gallery .grid-wrap {max-height: none !important;}  /* whole variants, no inner scroll box */
@media (max-width: 640px) {
  h1 {font-size: 1.45rem !important;}
  #stats table {font-size: 0.8rem;}
  #stats td, #stats th {padding: 4px 6px !important; word-break: normal !important;}
  #aoi-table {font-size: 0.8rem;}
}
"""
# Raw <head> CSS: gradio scopes `css` to the content area, but the page's own 32 px side padding
# must shrink on phones for the columns (min 280 px) to fit a 390 px screen without sideways scrolling.
HEAD = (
    "<style>@media (max-width: 640px) "
    "{ .main.fillable { padding-left: 8px !important; padding-right: 8px !important; } }</style>"
)


@dataclass(frozen=True)
class Display:
    """What the display controls are set to (also the API's fixed rendering)."""

    colormap: str = "turbo"
    opacity: float = 0.6
    blur: float = 0.0  # Gaussian sigma, % of the image's longer side
    peaks: int = 3

    @classmethod
    def of(cls, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> Display:
        """From raw control values, with anything out of range clamped (the API can send anything)."""
        default = cls()
        cmap = colormap if colormap in COLORMAPS else default.colormap
        return cls(
            colormap=cmap,
            opacity=float(np.clip(_num(opacity, default.opacity), 0.0, 1.0)),
            blur=float(np.clip(_num(blur, default.blur), 0.0, 10.0)),
            peaks=int(np.clip(_num(peaks, default.peaks), 0, 5)),
        )


DEFAULT = Display()


def _num(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


@dataclass
class Analysis:
    """One upload's prediction, kept per session so display changes never re-run the model."""

    name: str
    image: np.ndarray  # H x W x 3 uint8, output size (original up to serving.MAX_OUTPUT_SIDE)
    saliency: np.ndarray  # H x W float32 in [0, 1], same size
    preview_image: np.ndarray  # the same, at most serving.PREVIEW_SIDE px
    preview_map: np.ndarray
    folder: Path  # where this upload's download files are written
    stats_cache: dict[tuple[float, int], AttentionStats] = field(default_factory=dict)
    map_file: Path | None = None

    @property
    def stem(self) -> str:
        return _safe_stem(self.name)

    def stats(self, display: Display) -> AttentionStats:
        key = (display.blur, display.peaks)
        if key not in self.stats_cache:
            shown = render.blur(self.preview_map, display.blur / 100)
            self.stats_cache[key] = attention_stats(shown, display.peaks)
        return self.stats_cache[key]

    def aoi_shares(self, boxes: list[Box]) -> list[AoiShare]:
        """Each AOI's share of the predicted attention, on the stored map (never the model)."""
        return analysis.aoi_shares(self.preview_map, boxes)

    def focus(self, mass: float) -> np.ndarray:
        return render.render_focus(self.preview_image, self.preview_map, mass)

    def order(self, places: int) -> list[analysis.Fixation]:
        return analysis.viewing_order(self.preview_map, places)

    def save_aoi_csv(self, boxes: list[Box], model: str) -> Path:
        """The AOIs and their numbers as CSV (fractions and full-size pixels, so both can be reused)."""
        return render.write_csv(aoi_csv_rows(self.name, self.saliency.shape, boxes, self.aoi_shares(boxes), model),
                                self.folder / f"{self.stem}_aois.csv")  # fmt: skip

    def save_map(self) -> Path:
        """The map as a 16-bit PNG at full size (written once per upload)."""
        if self.map_file is None:
            self.map_file = render.save_map_png(self.saliency, self.folder / f"{self.stem}_saliency.png")
        return self.map_file

    def save_overlay(self, display: Display) -> Path:
        """The full-size overlay as PNG, for the current display settings."""
        return render.save_rgb_png(self.overlay(display, full_size=True), self.folder / f"{self.stem}_overlay.png")

    def overlay(self, display: Display, full_size: bool = False) -> np.ndarray:
        image, saliency = (self.image, self.saliency) if full_size else (self.preview_image, self.preview_map)
        out, _ = render.render_overlay(
            image,
            saliency,
            colormap=display.colormap,
            opacity=display.opacity,
            sigma=display.blur / 100,
            stats=self.stats(display),
        )
        return out


def _safe_stem(name: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "image"
    return stem[:80]


# -- areas of interest, focus, viewing order -----------------------------------------------------------

FOCUS_CHOICES = [(f"{level:.0%}", level) for level in analysis.FOCUS_LEVELS]
DEFAULT_FOCUS = 0.75
DEFAULT_PLACES = 5
MAX_PLACES = 10
MAX_AOIS = 20
AOI_HEADERS = ["AOI", "Attention", "Area", "Ratio", "Rank"]  # ratio: attention ÷ area
CSV_HEADERS = ["image", "aoi", "attention_share", "area_share", "ratio", "rank", "x0", "y0", "x1", "y1",
               "xmin_px", "ymin_px", "xmax_px", "ymax_px", "model"]  # fmt: skip
# Measured by `python -m train.evaluate --aoi` (README, "How far to trust AOI shares").
AOI_AGREEMENT = (
    "AOI shares agree with real eye-tracking within 6.0 points on average (the centre prior: 7.4), "
    "see *How far to trust AOI shares* in the README."
)
ORDER_NOTE = (
    "An estimate from the map (winner-take-all with inhibition of return: the strongest spot, then the "
    "strongest one not yet visited), not a scanpath model."
)
VARIANTS = "ABCD"
# On a phone the columns stack and the result lands below the photo, out of sight: bring it up.
SHOW_RESULT_JS = """() => {
  if (window.innerWidth <= 640) document.getElementById("status")?.scrollIntoView({behavior: "smooth", block: "start"});
}"""


def focus_level(value: Any) -> float:
    level = _num(value, DEFAULT_FOCUS)
    return min(analysis.FOCUS_LEVELS, key=lambda lv: abs(lv - level))


def places_count(value: Any) -> int:
    return int(np.clip(_num(value, DEFAULT_PLACES), 1, MAX_PLACES))


def boxes_from_annotator(value: Any) -> list[Box]:
    """AOIs from the annotator's value (pixel boxes on the shown preview) as fractions of the image."""
    if not isinstance(value, dict) or not value.get("boxes"):
        return []
    size = _annotated_size(value)
    boxes = []
    for i, b in enumerate(value["boxes"][:MAX_AOIS]):
        name = str(b.get("label") or "").strip() or f"AOI {i + 1}"
        color = b.get("color")  # the editor's colour for the box, kept for the report and Compare
        color = tuple(int(c) for c in color) if isinstance(color, (list, tuple)) and len(color) == 3 else None
        try:
            boxes.append(Box.from_pixels(name, b["xmin"], b["ymin"], b["xmax"], b["ymax"], size, color))
        except (KeyError, TypeError, ValueError):
            continue  # a box dragged off the image, or still being drawn: nothing to measure
    return boxes


def _annotated_size(value: dict) -> tuple[int, int]:
    image = value.get("image")
    if isinstance(image, np.ndarray):
        return image.shape[:2]
    from PIL import Image

    with Image.open(image) as img:
        return img.height, img.width


def boxes_from_api(value: Any, size: tuple[int, int]) -> list[Box]:
    """AOIs sent to /analyze: a list of {"name", "xmin", "ymin", "xmax", "ymax"} in pixels of the image
    as sent (`size` is its (height, width)); raises gr.Error with one sentence naming the bad box."""
    if value in (None, "", []):
        return []
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as err:
            raise gr.Error(f"boxes is not valid JSON ({err}); send a list like [{{\"name\": \"logo\", \"xmin\": 10, "
                           "\"ymin\": 10, \"xmax\": 200, \"ymax\": 80}].") from err  # fmt: skip
    if isinstance(value, dict) and "boxes" in value:
        value = value["boxes"]
    if not isinstance(value, list):
        raise gr.Error("boxes must be a list of {name, xmin, ymin, xmax, ymax} in pixels of the image.")
    if len(value) > MAX_AOIS:
        raise gr.Error(f"{len(value)} boxes is more than the {MAX_AOIS} an analysis takes; send fewer.")
    boxes = []
    for i, b in enumerate(value):
        try:
            name = str(b.get("name") or b.get("label") or f"AOI {i + 1}")
            boxes.append(Box.from_pixels(name, float(b["xmin"]), float(b["ymin"]), float(b["xmax"]), float(b["ymax"]), size))
        except ValueError as err:
            raise gr.Error(str(err)) from err
        except (KeyError, TypeError, AttributeError) as err:
            raise gr.Error(f"boxes[{i}] ({b!r}) needs numbers xmin, ymin, xmax, ymax in pixels of the image "
                           "(and optionally a name).") from err  # fmt: skip
    return boxes


def aoi_table(rows: list[AoiShare]) -> list[list[str]]:
    """The rows shown on the page (and in the report), by rank: name, attention, area, ratio, rank."""
    return [[r.name, f"{r.share:.1%}", f"{r.area:.1%}", f"{r.ratio:.1f} ×", str(r.rank)] for r in sorted(rows, key=lambda r: r.rank)]


def aoi_csv_rows(image: str, size: tuple[int, int], boxes: list[Box], rows: list[AoiShare], model: str) -> list[list[Any]]:
    out: list[list[Any]] = [CSV_HEADERS]
    for box, r in sorted(zip(boxes, rows), key=lambda pair: pair[1].rank):  # by rank, as the table
        out.append([image, r.name, f"{r.share:.4f}", f"{r.area:.4f}", f"{r.ratio:.3f}", r.rank,
                    *(f"{v:.4f}" for v in (box.x0, box.y0, box.x1, box.y1)), *box.to_pixels(size), model])  # fmt: skip
    return out


def annotator_value(image: np.ndarray, boxes: list[Box]) -> dict:
    """The annotator showing `image` with `boxes` (fractions) drawn at its size."""
    h, w = image.shape[:2]
    return {
        "image": image,
        "boxes": [dict(zip(("xmin", "ymin", "xmax", "ymax"), b.to_pixels((h, w))), label=b.name,
                       color=render.aoi_color(boxes, i)) for i, b in enumerate(boxes)],
    }  # fmt: skip


def comparison_markdown(names: list[str], table: list[analysis.AoiComparison]) -> str:
    """Which variant gives each AOI the larger share, as a Markdown table."""
    letters = [f"{VARIANTS[i]} ({n})" for i, n in enumerate(names)]
    lines = ["| AOI | " + " | ".join(letters) + " | Larger share |", "|---" * (len(names) + 2) + "|"]
    for row in sorted(table, key=lambda r: -r.shares[0]):  # by A's share, as the AOI table ranks
        best = "tie (within 0.5 points)" if row.winner is None else f"**{VARIANTS[row.winner]}**"
        lines.append(f"| {row.name} | " + " | ".join(f"{s:.1%}" for s in row.shares) + f" | {best} |")
    return "\n".join(lines)


# -- text shown on the page ------------------------------------------------------------------------


def stats_markdown(stats: AttentionStats, size: tuple[int, int]) -> str:
    """The attention statistics as Markdown: a one-line summary and a table of the numbered regions."""
    h, w = size
    lines = []
    if stats.regions:
        n = len(stats.regions)
        lines.append(
            f"**The {n} numbered peak region{'s' if n > 1 else ''} hold{'' if n > 1 else 's'} "
            f"{stats.regions_share:.0%} of the predicted attention in {stats.regions_area:.0%} of the image.**"
        )
    lines.append(
        f"The 10 % most salient pixels hold {stats.top10_share:.0%} of it "
        "(10 % would mean attention spread evenly; near 100 %, one spot takes it all)."
    )
    if stats.regions:
        lines += ["", "| # | Share | Area | Peak at (px) | Peak height |", "|---|---|---|---|---|"]
        for r in stats.regions:  # the peak is where the region's number is drawn
            px, py = round(r.peak[0] * w), round(r.peak[1] * h)
            lines.append(f"| {r.index} | {r.share:.1%} | {r.area:.1%} | {px}, {py} | {r.peak_value:.2f} |")
        lines += [
            "",
            "*Share*: the region's part of all predicted attention. A region is the area around a peak where "
            "the map stays above half the peak's value; *Peak at* is where its number is drawn (x, y from the "
            "top left); *Peak height* is the peak relative to the highest one.",
        ]
    return "\n".join(lines)


def status_markdown(store: ModelStore, upload: serving.Upload | None = None, seconds: float | None = None) -> str:
    where = f"**{store.device_label()}**"
    if upload is None:
        if store.error is not None:
            return f"⚠️ {store.error}"
        state = "ready" if store.loaded else "loading…"
        return f"Model `{store.spec.model}` on {where} ({state}). Drop an image to start."
    oh, ow = upload.original_size
    parts = [f"{where} · inference {seconds:.2f} s · {ow} × {oh} px"]
    if upload.downscaled:
        h, w = upload.image.shape[:2]
        parts.append(f"maps at {w} × {h} (the cap is {serving.MAX_OUTPUT_SIDE} px per side)")
    if upload.animated:
        parts.append("first frame of an animated image")
    return " · ".join(parts)


# -- handlers ------------------------------------------------------------------------------------------


def _fail(err: BaseException, name: str = "the image") -> gr.Error:
    """One gr.Error sentence for anything a handler can hit (and a log line with the traceback)."""
    if isinstance(err, (UploadError, ModelLoadError)):
        return gr.Error(str(err))
    if isinstance(err, MemoryError):
        return gr.Error(f"The server ran out of memory on {name}; try a smaller image.")
    log.exception("unexpected error on %s", name)
    return gr.Error(f"Something went wrong on {name} ({type(err).__name__}: {err}); try another image.")


class Handlers:
    """The functions behind the page's events, closing over one model store and output folders."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self.folders = serving.OutputFolders()
        self.infer = serving.on_gpu(store.predict)

    def _analyse_one(self, payload: Any) -> tuple[Analysis, serving.Upload, float]:
        folder = self.folders.new()
        path, name = serving.read_payload(payload, folder)
        upload = serving.read_upload(path, name)
        self.store.get()  # load in this process first: on ZeroGPU `infer` runs in a forked worker
        (saliency,), seconds = self.infer([upload.image])
        analysis = Analysis(
            name=name,
            image=upload.image,
            saliency=saliency,
            preview_image=render.fit_within(upload.image, serving.PREVIEW_SIDE),
            preview_map=render.fit_within(saliency, serving.PREVIEW_SIDE),
            folder=folder,
        )
        return analysis, upload, seconds

    def analyse(self, payload: Any, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> tuple:
        """Upload -> state, overlay, grey map, before/after, statistics, status (files follow in `export`)."""
        if payload is None:  # the input was cleared
            return None, None, None, None, "", status_markdown(self.store)
        display = Display.of(colormap, opacity, blur, peaks)
        name = payload.get("orig_name", "the image") if isinstance(payload, dict) else "the image"
        try:
            analysis, upload, seconds = self._analyse_one(payload)
            overlay = analysis.overlay(display)
            stats = stats_markdown(analysis.stats(display), analysis.saliency.shape)
        except Exception as err:
            raise _fail(err, name) from err
        if upload.tiny:
            h, w = upload.original_size
            gr.Warning(f"{upload.name} is only {w} x {h} pixels; a map of an image this small says little.")
        return (
            analysis,
            overlay,
            np.asarray(map_to_image(analysis.preview_map)),
            (analysis.preview_image, overlay),
            stats,
            status_markdown(self.store, upload, seconds),
        )

    def rerender(self, analysis: Analysis | None, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> tuple:
        """A display control changed: overlay, before/after and statistics, without the model."""
        if analysis is None:
            return gr.skip(), gr.skip(), gr.skip()
        display = Display.of(colormap, opacity, blur, peaks)
        try:
            overlay = analysis.overlay(display)
            stats = stats_markdown(analysis.stats(display), analysis.saliency.shape)
        except Exception as err:
            raise _fail(err, analysis.name) from err
        return overlay, (analysis.preview_image, overlay), stats

    def export(self, analysis: Analysis | None, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> tuple:
        """The full-size map and overlay PNGs for the download buttons, written after the page shows
        the preview (a 4096 px PNG takes about a second to encode)."""
        if analysis is None:  # the input was cleared: nothing to download
            return gr.update(value=None, interactive=False), gr.update(value=None, interactive=False)
        try:
            map_file = analysis.save_map()
            overlay_file = analysis.save_overlay(Display.of(colormap, opacity, blur, peaks))
            return (
                gr.update(value=str(map_file), interactive=True),
                gr.update(value=str(overlay_file), interactive=True),
            )
        except Exception as err:
            raise _fail(err, analysis.name) from err

    def export_overlay(self, analysis: Analysis | None, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> Any:
        """The full-size overlay PNG again, after a display control changed."""
        if analysis is None:
            return gr.skip()
        try:
            return str(analysis.save_overlay(Display.of(colormap, opacity, blur, peaks)))
        except Exception as err:
            raise _fail(err, analysis.name) from err

    # -- areas of interest, focus map, viewing order, report (all from the stored map) --------------

    def views(self, analysis: Analysis | None, boxes: Any, focus: Any, places: Any) -> tuple:
        """After an upload: focus map, viewing order, the AOI editor on the new image (the AOIs
        drawn so far carried over by relative position) and their table."""
        if analysis is None:
            return None, None, None, []
        boxes = list(boxes or [])
        try:
            order = render.render_viewing_order(analysis.preview_image, analysis.order(places_count(places)))
            return (
                analysis.focus(focus_level(focus)),
                order,
                annotator_value(analysis.preview_image, boxes),
                aoi_table(analysis.aoi_shares(boxes)),
            )
        except Exception as err:
            raise _fail(err, analysis.name) from err

    def edit_aois(self, analysis: Analysis | None, annotated: Any) -> tuple:
        """The AOIs were drawn, moved, renamed or removed: their table, from the stored map."""
        if analysis is None:
            return gr.skip(), []
        try:
            boxes = boxes_from_annotator(annotated)
            return boxes, aoi_table(analysis.aoi_shares(boxes))
        except Exception as err:
            raise _fail(err, analysis.name) from err

    def focus_view(self, analysis: Analysis | None, focus: Any) -> Any:
        if analysis is None:
            return gr.skip()
        return analysis.focus(focus_level(focus))

    def order_view(self, analysis: Analysis | None, places: Any) -> Any:
        if analysis is None:
            return gr.skip()
        return render.render_viewing_order(analysis.preview_image, analysis.order(places_count(places)))

    def model_label(self) -> str:
        """Which model made a result: its id or folder, the revision, and the device it ran on."""
        spec = self.store.spec
        revision = f" @ {spec.revision}" if spec.revision else ""
        return f"{spec.model}{revision} · {self.store.device_label()}"

    def report(self, analysis: Analysis, display: Display, boxes: list[Box], focus: float, places: int) -> np.ndarray:
        """The one-page report: image, heatmap (peak regions and AOIs), focus map, viewing order,
        the AOI table (or the peak regions when there are no AOIs), the model and the date."""
        import datetime

        stats = analysis.stats(display)
        order = analysis.order(places)
        overlay = analysis.overlay(display)
        heat = render.draw_aois(overlay, boxes, analysis.aoi_shares(boxes) if boxes else None,
                                avoid=render.region_badges(stats.regions, overlay.shape))  # tags clear of the numbers
        panels = [
            render.ReportPanel("Image", analysis.preview_image),
            render.ReportPanel("Predicted attention (numbered peak regions" + (", AOIs)" if boxes else ")"), heat),
            render.ReportPanel(f"Focus map: the smallest region holding {focus:.0%} of the attention", analysis.focus(focus)),
            render.ReportPanel(f"Likely viewing order, first {len(order)} places (an estimate)",
                               render.render_viewing_order(analysis.preview_image, order)),  # fmt: skip
        ]
        if boxes:
            rows = aoi_table(analysis.aoi_shares(boxes))
            # The report's font (Pillow's own) has no "÷" or "×".
            table = [AOI_HEADERS] + [[c.replace("×", "x") for c in row] for row in rows]
        else:
            table = [["Peak region", "Attention", "Area", "Peak height"]] + [
                [str(r.index), f"{r.share:.1%}", f"{r.area:.1%}", f"{r.peak_value:.2f}"] for r in stats.regions
            ]
        h, w = analysis.saliency.shape
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        notes = [
            f"The 10 % most salient pixels hold {stats.top10_share:.0%} of the predicted attention; "
            f"the numbered peak regions hold {stats.regions_share:.0%} in {stats.regions_area:.0%} of the image.",
            "Viewing order: " + ORDER_NOTE,
            AOI_AGREEMENT.replace("*", ""),
            f"Model: {self.model_label()} · map {w} x {h} px · made {when}.",
        ]
        return render.render_report(f"Where do people look? {analysis.name}", panels, table, notes)

    def export_analysis(self, analysis: Analysis | None, boxes: Any, colormap: Any, opacity: Any, blur: Any, peaks: Any,
                        focus: Any, places: Any) -> tuple:  # fmt: skip
        """The AOI CSV and the report PNG for the download buttons, for the current settings."""
        if analysis is None:
            return gr.update(value=None, interactive=False), gr.update(value=None, interactive=False)
        boxes = list(boxes or [])
        try:
            csv_file = analysis.save_aoi_csv(boxes, self.model_label()) if boxes else None
            page = self.report(analysis, Display.of(colormap, opacity, blur, peaks), boxes, focus_level(focus), places_count(places))
            report_file = render.save_rgb_png(page, analysis.folder / f"{analysis.stem}_report.png")
        except Exception as err:
            raise _fail(err, analysis.name) from err
        return (
            gr.update(value=str(csv_file) if csv_file else None, interactive=csv_file is not None),
            gr.update(value=str(report_file), interactive=True),
        )

    def compare(self, payloads: Any, boxes: Any, colormap: Any, opacity: Any) -> tuple:
        """2-4 variants -> overlays on one colour scale with the same AOIs, the comparison table, a status."""
        files = [p for p in (payloads or []) if p]
        if not 2 <= len(files) <= len(VARIANTS):
            raise gr.Error(f"Add two to four variants of the design to compare ({len(files)} given).")
        display = Display.of(colormap, opacity, 0, 0)
        boxes = list(boxes or [])
        folder = self.folders.new()
        try:
            uploads = [serving.read_upload(*serving.read_payload(p, folder)) for p in files]
            self.store.get()
            maps, seconds = self.infer([u.image for u in uploads])
        except Exception as err:
            raise _fail(err, "a variant") from err
        previews = [render.fit_within(u.image, serving.PREVIEW_SIDE) for u in uploads]
        small_maps = [render.fit_within(m, serving.PREVIEW_SIDE) for m in maps]
        gallery, per_variant = [], []
        for i, (upload, image, shown) in enumerate(zip(uploads, previews, render.common_scale(small_maps))):
            rows = analysis.aoi_shares(small_maps[i], boxes)
            per_variant.append(rows)
            stats = attention_stats(small_maps[i], 0)
            drawn = render.draw_aois(render.heat_overlay(image, shown, display.colormap, display.opacity), boxes, rows or None)
            caption = f"{VARIANTS[i]}: {upload.name} · top 10 % of pixels hold {stats.top10_share:.0%}"
            # On the image too: the gallery shows captions only in its enlarged view.
            gallery.append((render.caption_bar(drawn, caption), caption))
        names = [u.name for u in uploads]
        if boxes:
            table = comparison_markdown(names, analysis.compare_aois(per_variant))
        else:
            table = ("No areas of interest yet: draw them on the *Image* tab (on any one variant); they are "
                     "applied here to every variant by relative position.")  # fmt: skip
        status = (f"{len(uploads)} variants on **{self.store.device_label()}** in {seconds:.2f} s of inference. "
                  "One colour scale for all: equal colours mean equal attention per unit of area.")  # fmt: skip
        return gallery, table, status

    def api_analyze(self, image: Any, boxes: Any, focus: Any, places: Any) -> tuple:
        """The /analyze endpoint: image + AOI boxes in; the AOI table (with viewing order and focus
        region) as JSON, and the overlay, focus map and viewing order as PNGs (preview size)."""
        if image is None:
            raise gr.Error("No image was sent; pass one image file, e.g. handle_file('photo.jpg').")
        name = image.get("orig_name", "the image") if isinstance(image, dict) else "the image"
        try:
            analysis_, upload, _ = self._analyse_one(image)
        except Exception as err:
            raise _fail(err, name) from err
        aois = boxes_from_api(boxes, upload.original_size)
        try:
            mass, n = focus_level(focus), places_count(places)
            rows = analysis_.aoi_shares(aois)
            order = analysis_.order(n)
            mask = analysis.focus_mask(analysis_.preview_map, mass)
            stats = analysis_.stats(DEFAULT)
            table = {
                "image": analysis_.name,
                "model": self.model_label(),
                "aois": [{"name": r.name, "attention_share": r.share, "area_share": r.area, "ratio": r.ratio, "rank": r.rank,
                          "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), b.to_pixels(upload.original_size)))}
                         for b, r in zip(aois, rows)],  # fmt: skip
                "viewing_order": [{"index": f.index, "x": round(f.x * upload.original_size[1], 1),
                                   "y": round(f.y * upload.original_size[0], 1), "value": f.value} for f in order],  # fmt: skip
                "focus": {"mass": mass, "area_share": float(mask.mean())},
                "peak_regions": [{"index": r.index, "attention_share": r.share, "area_share": r.area} for r in stats.regions],
                "top10_share": stats.top10_share,
                "note": ORDER_NOTE,
            }
            heat = render.draw_aois(analysis_.overlay(DEFAULT), aois, rows or None)
            files = [
                render.save_rgb_png(heat, analysis_.folder / f"{analysis_.stem}_aois.png"),
                render.save_rgb_png(analysis_.focus(mass), analysis_.folder / f"{analysis_.stem}_focus.png"),
                render.save_rgb_png(render.render_viewing_order(analysis_.preview_image, order),
                                    analysis_.folder / f"{analysis_.stem}_order.png"),  # fmt: skip
            ]
        except Exception as err:
            raise _fail(err, name) from err
        return (table, *(str(f) for f in files))

    def api_predict(self, image: Any) -> tuple[str, str]:
        """The /predict endpoint: image in; overlay PNG (RGB) and map PNG (16-bit grey) out, both full size."""
        if image is None:
            raise gr.Error("No image was sent; pass one image file, e.g. handle_file('photo.jpg').")
        name = image.get("orig_name", "the image") if isinstance(image, dict) else "the image"
        try:
            analysis, _, _ = self._analyse_one(image)
            overlay_file = analysis.save_overlay(Display(peaks=0))  # a plain heatmap, no outlines
            map_file = analysis.save_map()
        except Exception as err:
            raise _fail(err, name) from err
        return str(overlay_file), str(map_file)

    def batch(self, payloads: Any, colormap: Any, opacity: Any, blur: Any, peaks: Any) -> tuple:
        """Several images -> gallery of overlays, one zip of maps (+ summary.csv), a status line."""
        files = [p for p in (payloads or []) if p]
        if not files:
            raise gr.Error("Add one or more images to the batch first.")
        if len(files) > serving.MAX_BATCH:
            raise gr.Error(f"{len(files)} files is more than the {serving.MAX_BATCH} a batch takes; split them up.")
        display = Display.of(colormap, opacity, blur, peaks)
        folder = self.folders.new()
        gallery: list[tuple[np.ndarray, str]] = []
        failures: list[str] = []
        rows: list[list[Any]] = []
        timing = [0.0]

        def entries() -> Iterator[tuple[str, bytes]]:
            used: set[str] = set()
            for start in range(0, len(files), serving.BATCH_CHUNK):
                uploads = []
                for payload in files[start : start + serving.BATCH_CHUNK]:
                    try:
                        path, name = serving.read_payload(payload, folder)
                        uploads.append(serving.read_upload(path, name))
                    except UploadError as err:
                        failures.append(str(err))
                if not uploads:
                    continue
                self.store.get()
                maps, seconds = self.infer([u.image for u in uploads])
                timing[0] += seconds
                for upload, saliency in zip(uploads, maps):
                    stem = _safe_stem(upload.name)
                    while stem in used:
                        stem += "_"
                    used.add(stem)
                    preview_map = render.fit_within(saliency, serving.PREVIEW_SIDE)
                    shown = render.blur(preview_map, display.blur / 100)
                    stats = attention_stats(shown, display.peaks)
                    overlay, _ = render.render_overlay(
                        render.fit_within(upload.image, serving.PREVIEW_SIDE),
                        preview_map,
                        colormap=display.colormap,
                        opacity=display.opacity,
                        sigma=display.blur / 100,
                        stats=stats,
                    )
                    n = len(stats.regions)
                    regions = f"{n} peak region{'' if n == 1 else 's'}"
                    caption = f"{upload.name}: {regions}, {stats.regions_share:.0%} of the attention"
                    gallery.append((overlay, caption))
                    h, w = saliency.shape
                    shares = (stats.regions_share, stats.regions_area, stats.top10_share)
                    rows.append([f"{stem}_saliency.png", upload.name, w, h, n, *(f"{x:.4f}" for x in shares)])
                    yield f"{stem}_saliency.png", render.png_bytes(map_to_image(saliency, bits=16))
            table = io.StringIO()
            writer = csv.writer(table)
            writer.writerow(["map", "image", "width", "height", "regions", "regions_share", "regions_area", "top10_share"])
            writer.writerows(rows)
            yield "summary.csv", table.getvalue().encode("utf-8")

        try:
            archive = render.write_zip(entries(), folder / "saliency_maps.zip")
        except Exception as err:
            raise _fail(err, "the batch") from err
        if not gallery:
            raise gr.Error(f"None of the {len(files)} files could be read: " + " ".join(failures))
        device = self.store.device_label()
        status = f"{len(gallery)} of {len(files)} images on **{device}** in {timing[0]:.2f} s of inference."
        if failures:
            status += "\n\nSkipped: " + " ".join(failures)
        return gallery, gr.update(value=str(archive), visible=True), status


# -- the page ------------------------------------------------------------------------------------------


def _image_input() -> gr.Image:
    return gr.Image(
        label="Your image",
        sources=["upload", "clipboard", "webcam"],
        type="filepath",
        image_mode=None,  # decoding is ours (preprocess=False), whatever the mode
        height=420,
        elem_id="input-image",
        placeholder="Drop an image here\nor click to upload · paste · use the webcam",
    )


@dataclass
class Views:
    overlay: gr.Image
    grey: gr.Image
    slider: gr.ImageSlider
    focus: gr.Image | None = None
    focus_level: gr.Radio | None = None
    order: gr.Image | None = None
    places: gr.Slider | None = None


def _result_views() -> Views:
    """Overlay, grey map and before/after slider, one tab each (labels hidden: the tabs name them)."""
    common = {"show_label": False, "interactive": False, "buttons": ["fullscreen"]}
    with gr.Tabs():
        with gr.Tab("Overlay", id="overlay"):
            overlay = gr.Image(label="Predicted attention", format="webp", height=420, elem_id="overlay", **common)
        with gr.Tab("Saliency map", id="map"):
            grey = gr.Image(label="Saliency map (white = most looked at)", format="png", height=420, elem_id="map",
                            **common)  # fmt: skip
        with gr.Tab("Before / after", id="slider"):
            slider = gr.ImageSlider(label="Drag to compare", format="webp", max_height=420, elem_id="before-after",
                                    **common)  # fmt: skip
    return Views(overlay, grey, slider)


def _analysis_views(views: Views) -> Views:
    """Focus map and likely viewing order: a second group of tabs (five in one bar do not fit a phone)."""
    common = {"show_label": False, "interactive": False, "buttons": ["fullscreen"]}
    with gr.Tabs(elem_id="analysis-views"):
        with gr.Tab("Focus map", id="focus"):
            views.focus = gr.Image(label="Focus map", format="webp", height=420, elem_id="focus", **common)
            views.focus_level = gr.Radio(FOCUS_CHOICES, value=DEFAULT_FOCUS, label="Outline the smallest region holding "
                                         "this much of the attention (the rest fades out)", elem_id="focus-level")  # fmt: skip
        with gr.Tab("Viewing order", id="order"):
            views.order = gr.Image(label="Likely viewing order", format="webp", height=420, elem_id="order", **common)
            views.places = gr.Slider(1, MAX_PLACES, value=DEFAULT_PLACES, step=1, label="Places", elem_id="places")
            gr.Markdown(f"*{ORDER_NOTE}*")
    return views


def _aoi_editor() -> Any:
    """The AOI editor: `gradio_image_annotation` (rectangles on the image, each with a label)."""
    from gradio_image_annotation import image_annotator

    return image_annotator(
        label="Areas of interest",
        show_label=False,  # a floating label would cover the top of the image, where boxes are drawn
        image_type="filepath",  # the image is only shown; the map is in the session's state
        sources=[],
        show_clear_button=False,
        show_download_button=False,
        show_remove_button=True,
        box_min_size=4,
        height=420,
        elem_id="aoi-editor",
    )


def _controls() -> list[gr.components.Component]:
    """Colormap, opacity, blur and number of peak regions, in the order Handlers take them."""
    with gr.Accordion("Display", open=True):
        return [
            gr.Radio(COLORMAP_CHOICES, value=DEFAULT.colormap, label="Colormap", elem_id="colormap"),
            gr.Slider(0, 1, value=DEFAULT.opacity, step=0.05, label="Heatmap opacity", elem_id="opacity"),
            gr.Slider(0, 10, value=DEFAULT.blur, step=0.5, label="Blur (% of image size)", elem_id="blur"),
            gr.Slider(0, 5, value=DEFAULT.peaks, step=1, label="Numbered peak regions", elem_id="peaks"),
        ]


def build_demo(store: ModelStore) -> gr.Blocks:
    """The whole page. Nothing runs until an event fires; the model loads on first use."""
    h = Handlers(store)
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))
    # Every path to the model shares one concurrency group: one inference at a time per process.
    inference = {"concurrency_id": "inference", "concurrency_limit": serving.INFERENCE_CONCURRENCY}
    private = {"api_visibility": "private"}  # the page's own events; the public API is /predict
    quiet = {"show_progress": "hidden", **private}

    with gr.Blocks(title=TITLE, delete_cache=(1800, 3600), analytics_enabled=False) as demo:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Tabs():
            with gr.Tab("Image", id="single"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=280):
                        image_in = _image_input()
                        gr.Examples(examples, inputs=image_in, label="Examples (public-domain photos)", elem_id="examples")
                    with gr.Column(scale=1, min_width=280):
                        status = gr.Markdown(status_markdown(store), elem_id="status")
                        views = _result_views()
                        with gr.Row():
                            download = {"size": "md", "interactive": False}  # enabled once there is a file
                            map_dl = gr.DownloadButton("Download map (16-bit PNG)", elem_id="download-map", **download)
                            overlay_dl = gr.DownloadButton("Download overlay (PNG)", elem_id="download-overlay", **download)
                            report_dl = gr.DownloadButton("Download report (PNG)", elem_id="download-report", **download)
                        _analysis_views(views)
                        controls = _controls()
                        stats = gr.Markdown(elem_id="stats")
                with gr.Accordion("Areas of interest", open=True, elem_id="aois"):
                    gr.Markdown(
                        "Drag a rectangle on the image below around each part of the design you care about (logo, "
                        "headline, call to action) and name it. Each gets its "
                        "share of the predicted attention, its share of the image area, and their *ratio*: *2 ×* means "
                        "twice the attention its size alone would get. Editing them never re-runs the model, and "
                        "they stay in place (by relative position) for the next image and for *Compare*. "
                        f"{AOI_AGREEMENT}"
                    )
                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1, min_width=280):
                            editor = _aoi_editor()
                        with gr.Column(scale=1, min_width=280):
                            aoi_rows = gr.Dataframe(headers=AOI_HEADERS, value=[], interactive=False, label="AOI table",
                                                    elem_id="aoi-table", wrap=True)  # fmt: skip
                            csv_dl = gr.DownloadButton("Download AOIs (CSV)", elem_id="download-csv", **download)
            with gr.Tab("Compare", id="compare"):
                gr.Markdown(
                    "Two to four variants of a design side by side, on one colour scale. The areas of interest drawn "
                    "on the *Image* tab are applied to every variant by relative position, and the table says which "
                    "variant gives each of them the larger share of attention."
                )
                compare_in = gr.File(label="Variants (2 to 4 images)", file_count="multiple", file_types=["image"],
                                     elem_id="compare-input")  # fmt: skip
                compare_go = gr.Button("Compare", variant="primary", elem_id="compare-go")
                compare_status = gr.Markdown(elem_id="compare-status")
                compare_gallery = gr.Gallery(label="Variants", show_label=False, columns=2, height="auto", object_fit="contain",
                                             format="webp", elem_id="compare-gallery")  # whole images, not square crops
                compare_table = gr.Markdown(elem_id="compare-table")
            with gr.Tab("Batch", id="batch"):
                gr.Markdown(
                    f"Up to {serving.MAX_BATCH} images at once. The zip holds each map as a 16-bit PNG at the "
                    "image's size and a `summary.csv` of the attention statistics."
                )
                batch_in = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="batch-input")
                batch_go = gr.Button("Predict all", variant="primary")
                batch_status = gr.Markdown()
                gallery = gr.Gallery(label="Overlays", columns=3, height="auto", object_fit="contain", format="webp", elem_id="gallery")
                zip_dl = gr.DownloadButton("Download all maps (zip)", visible=False, elem_id="download-zip")
        gr.Markdown(
            f"Images up to {serving.MAX_UPLOAD_MB} MB and {serving.MAX_PIXELS // 1_000_000} MP; maps are returned at "
            f"the original resolution up to {serving.MAX_OUTPUT_SIDE} px per side. Use the app from code through its "
            "API (`/predict` and `/analyze`): *Use via API* at the foot of the page on a wider screen (phones hide "
            f"it), and the `gradio_client` examples in [space/README.md]({SOURCE_URL}/blob/main/space/README.md)."
        )
        state = gr.State(None, time_to_live=1800)  # the upload's Analysis: image and map
        aoi_boxes = gr.State([], time_to_live=1800)  # the AOIs as fractions of the image (hub.analysis.Box)

        settings = [state, *controls]
        analysis_settings = [state, aoi_boxes, *controls, views.focus_level, views.places]
        analysed = image_in.change(
            h.analyse, [image_in, *controls], [state, views.overlay, views.grey, views.slider, stats, status],
            preprocess=False, show_progress_on=[views.overlay], trigger_mode="always_last", **inference, **private,
        )  # fmt: skip
        analysed.success(h.export, settings, [map_dl, overlay_dl], **quiet)
        analysed.success(None, js=SHOW_RESULT_JS, **quiet)
        analysed.success(
            h.views, [state, aoi_boxes, views.focus_level, views.places], [views.focus, views.order, editor, aoi_rows], **quiet
        ).success(h.export_analysis, analysis_settings, [csv_dl, report_dl], **quiet)
        gr.on(
            [c.change for c in controls], h.rerender, settings, [views.overlay, views.slider, stats],
            trigger_mode="always_last", **quiet,
        ).success(h.export_overlay, settings, overlay_dl, trigger_mode="always_last", **quiet)  # fmt: skip
        editor.change(h.edit_aois, [state, editor], [aoi_boxes, aoi_rows], trigger_mode="always_last", **quiet).success(
            h.export_analysis, analysis_settings, [csv_dl, report_dl], trigger_mode="always_last", **quiet
        )
        views.focus_level.change(h.focus_view, [state, views.focus_level], views.focus, **quiet)
        views.places.change(h.order_view, [state, views.places], views.order, trigger_mode="always_last", **quiet)
        gr.on(
            [views.focus_level.change, views.places.release, *(c.change for c in controls)], h.export_analysis,
            analysis_settings, [csv_dl, report_dl], trigger_mode="always_last", **quiet,
        )  # fmt: skip
        compare_go.click(
            h.compare, [compare_in, aoi_boxes, controls[0], controls[1]], [compare_gallery, compare_table, compare_status],
            preprocess=False, **inference, **private,
        )  # fmt: skip
        batch_go.click(
            h.batch, [batch_in, *controls], [gallery, zip_dl, batch_status], preprocess=False, **inference, **private
        )
        demo.load(lambda: status_markdown(store), None, status, **quiet)

        # The public API, /predict: one image in; the overlay and the map out, as PNG files.
        with gr.Column(visible=False):
            api_in = gr.Image(type="filepath", image_mode=None, label="image")
            api_outputs = [
                gr.Image(format="png", label="overlay"),
                gr.Image(format="png", label="saliency map (16-bit PNG)"),
            ]
            analyze_inputs = [
                gr.JSON(label="boxes"),
                gr.Number(value=DEFAULT_FOCUS, label="focus"),
                gr.Number(value=DEFAULT_PLACES, label="places"),
            ]
            analyze_outputs = [
                gr.JSON(label="table"),
                gr.Image(format="png", label="overlay with areas of interest"),
                gr.Image(format="png", label="focus map"),
                gr.Image(format="png", label="viewing order"),
            ]
        gr.on(
            [], h.api_predict, api_in, api_outputs, api_name="predict", preprocess=False, **inference,
            api_description="Saliency of one image: the heatmap overlay (RGB PNG) and the map (16-bit greyscale PNG), "
            f"both at the image's size (up to {serving.MAX_OUTPUT_SIDE} px per side).",
        )  # fmt: skip
        gr.on(
            [], h.api_analyze, [api_in, *analyze_inputs], analyze_outputs, api_name="analyze", preprocess=False, **inference,
            api_description="Attention analysis of one image. boxes: a list of {name, xmin, ymin, xmax, ymax} in pixels "
            "of the image (areas of interest; may be empty); focus: 0.5, 0.75 or 0.9 (the focus region holds this "
            f"share of the attention); places: 1-{MAX_PLACES} (likely viewing order). Returns the table as JSON (each "
            "AOI's attention_share, area_share, ratio, rank; the viewing order in pixels; the focus region; the peak "
            "regions; the model) and three RGB PNGs at preview size: the overlay with the AOIs, the focus map and the "
            "viewing order.",
        )  # fmt: skip
    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str | None = None,
    port: int | None = None,
    share: bool = False,
    quiet: bool = False,
) -> tuple[Any, str, str | None]:
    """Queue and serve the demo without blocking; returns (app, local_url, share_url).

    A share link that cannot be made (offline, blocked) is reported and the app keeps serving
    locally. Call `demo.block_thread()` afterwards to keep the process alive.
    """
    demo.queue(max_size=serving.QUEUE_SIZE, default_concurrency_limit=4)
    app, local_url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=f"{serving.MAX_UPLOAD_MB}mb",
        prevent_thread_lock=True,
        quiet=quiet,
        theme=gr.themes.Soft(primary_hue="orange", secondary_hue="slate"),
        css=CSS,
        head=HEAD,
        footer_links=["api", "gradio"],
    )
    if share and not share_url and not demo.space_id:
        print(
            f"--share: gradio could not create a public share link (see its message above; usually no internet "
            f"access or the share tunnel binary could not be downloaded), so the app is only served at {local_url}.",
            file=sys.stderr,
            flush=True,
        )
    return app, local_url, share_url

