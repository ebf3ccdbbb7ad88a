"""The atlas's HTML: plain pages with relative links that work from disk and without JavaScript; atlas.js only
adds sorting and the unit search box to layer pages (their controls stay hidden without it).

Pages are cheap, so every run rewrites all of them from the plan: links to units and images that gained a
page since an earlier run appear everywhere at once.
"""

from __future__ import annotations

import bisect
import html
from collections import defaultdict
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import numpy as np

from actindex.indexer.atomic import atomic_write
from actindex.indexer.images import crop_geometry

from .plan import Plan


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def number(value: float) -> str:
    return "–" if not np.isfinite(value) else f"{value:.4g}"


def document(title: str, body: str, depth: int, script: bool = False) -> str:
    up = "../" * depth
    js = f'\n<script src="{up}atlas.js" defer></script>' if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f'<link rel="stylesheet" href="{up}atlas.css">{js}\n</head>\n<body>\n{body}\n</body>\n</html>\n')


def crumbs(depth: int, *parts: tuple[str, str | None]) -> str:
    """Breadcrumbs: (text, url relative to the site root or None for the current page)."""
    up = "../" * depth
    links = [f'<a href="{up}index.html">atlas</a>']
    links += [f'<a href="{up}{url}">{esc(text)}</a>' if url else f"<span>{esc(text)}</span>" for text, url in parts]
    return f'<nav class="crumbs">{" › ".join(links)}</nav>'


def rf_text(plan: Plan, layer: str) -> str:
    hits = plan.layers[layer].hits
    (ry, rx), (sy, sx) = hits.grid.rf_size, hits.grid.rf_stride
    size = f"{ry} px" if ry == rx else f"{ry}×{rx} px"
    stride = f"{sy}" if sy == sx else f"{sy}×{sx}"
    return f"receptive field {size}, stride {stride}"


def tile(plan: Plan, layer: str, unit: int, depth: int, label: str = "") -> str:
    """A unit's best patch, linked to its page when it has one."""
    up = "../" * depth
    hits = plan.layers[layer].hits
    mean = plan.layers[layer].mean
    best = float(hits.value[unit, 0])
    data = f'data-unit="{unit}" data-max="{best if np.isfinite(best) else "-Infinity"}"'
    if mean is not None:
        data += f' data-mean="{float(mean[unit])}"'
    profile = plan.layers[layer].profile
    for key, values in (("firing", profile.firing_rate), ("selectivity", profile.selectivity)):
        if np.isfinite(values[unit]):
            data += f' data-{key}="{float(values[unit])}"'
    if hits.image[unit, 0] >= 0:
        picture = f'<img src="{up}{plan.unit_file(layer, unit, "p0")}" alt="best patch of unit {unit}" loading="lazy">'
    else:
        picture = '<span class="empty">no hits</span>'
    caption = f'<span class="n">{esc(label or unit)}</span><span class="v">{number(best)}</span>'
    if unit in plan.pages.get(layer, ()):
        return f'<a class="tile" id="u{unit}" {data} href="{up}{plan.unit_url(layer, unit)}">{picture}{caption}</a>'
    return f'<div class="tile nopage" id="u{unit}" {data} title="no page: add it with --units">{picture}{caption}</div>'


def front_page(plan: Plan) -> str:
    info = plan.info
    rows = []
    for name, layer in plan.layers.items():
        grid = layer.hits.grid
        pages = len(plan.pages.get(name, ()))
        rows.append(f'<tr><td><a href="{plan.layer_url(name)}">{esc(name)}</a></td><td>{grid.channels}</td>'
                    f"<td>{grid.height}×{grid.width}</td><td>{esc(rf_text(plan, name))}</td><td>{pages}</td></tr>")
    base = plan.index.parent
    record = info.build
    facts = [("model", info.model), ("weights", shown_path(info.weights, base) or "random (seed 0)"),
             ("data", shown_path(str(info.data_root), base)),
             ("images", f"{info.num_images} ({info.num_skipped} skipped)"), ("input", f"{info.input_size} px"),
             ("top-k", info.k)]
    build = [("built", record.created), ("time", f"{record.seconds:.1f} s"),
             ("throughput", f"{record.images_per_second:.1f} images/s"),
             ("device", f"{record.device} × {record.world_size} process(es)"),
             ("software", f"actindex {record.actindex_version}, torch {record.torch_version}")]
    if plan.neighbours is not None and info.faiss is not None:
        build.append(("similarity", f"{info.faiss.factory} over '{plan.similarity_layer}' "
                                    f"({info.faiss.count} vectors)"))
    skipped = ""
    if plan.skipped:
        items = "".join(f"<li>{esc(path)}: {esc(reason)}</li>" for path, reason in plan.skipped)
        count = plan.skipped_count
        more = f"<li>… {count - len(plan.skipped)} more</li>" if count > len(plan.skipped) else ""
        files = "1 file" if count == 1 else f"{count} files"
        skipped = f"<details><summary>{files} could not be read</summary><ul>{items}{more}</ul></details>"
    body = (f'<h1>{esc(info.model)}</h1>\n{definitions(facts)}\n<h2>Layers</h2>\n'
            '<table class="layers"><thead><tr><th>layer</th><th>units</th><th>map</th><th>receptive field</th>'
            f'<th>unit pages</th></tr></thead><tbody>{"".join(rows)}</tbody></table>\n'
            f'<h2>Images</h2>\n<p><a href="images/index.html">{len(plan.image_pages)} images</a> that are a top hit '
            f"of some unit, each with its nearest images.</p>\n<h2>The build</h2>\n{definitions(build)}\n{skipped}")
    return document(f"actindex atlas: {info.model}", body, 0)


def shown_path(path: str, base: Path) -> str:
    """A local path as a shared site may show it: relative to `base` (the index's folder) when below it, else its
    last part. A weights name ('ResNet18_Weights.IMAGENET1K_V1') stays as it is; atlas.json has the full paths."""
    if not path or not Path(path).is_absolute():
        return path
    try:
        return Path(path).relative_to(base.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def definitions(pairs: Iterable[tuple[str, object]]) -> str:
    return '<dl class="facts">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs) + "</dl>"


def layer_page(plan: Plan, name: str) -> str:
    layer = plan.layers[name]
    hits = layer.hits
    sorts = '<option value="unit">unit</option><option value="max">maximum</option>'
    if layer.mean is not None:
        sorts += '<option value="mean">mean</option>'
    if np.isfinite(layer.profile.firing_rate).any():
        sorts += '<option value="firing">firing rate</option>'
    if np.isfinite(layer.profile.selectivity).any():
        sorts += '<option value="selectivity">class selectivity</option>'
    controls = (f'<div class="controls" hidden><label>sort by <select id="sort">{sorts}</select></label> '
                '<label>unit <input id="find" type="search" inputmode="numeric" placeholder="number" '
                f'size="8"></label> <span id="shown"></span></div>')
    tiles = "\n".join(tile(plan, name, unit, 1) for unit in range(hits.grid.channels))
    mean_note = "" if layer.mean is not None else " (this index records no means: rebuild it to sort by mean)"
    body = (f"{crumbs(1, (name, None))}\n<h1>{esc(name)}</h1>\n"
            f"<p>{hits.grid.channels} units · feature map {hits.grid.height}×{hits.grid.width} · "
            f"{esc(rf_text(plan, name))} · "
            f"{len(plan.pages.get(name, ()))} unit pages. Each tile is the unit's best patch and its maximum "
            f"activation{mean_note}.</p>\n{controls}\n"
            f'<div class="tiles" id="tiles">\n{tiles}\n</div>')
    return document(f"{name} · actindex atlas", body, 1, script=True)


def score_chart(values: np.ndarray, mean: float | None, width: int = 360, height: int = 110) -> str:
    """Inline SVG: the unit's top-k scores as bars, and its mean over all images as a dashed line."""
    values = values[np.isfinite(values)]
    left, top, bottom = 44, 8, 18
    levels = [*values.tolist(), 0.0] + ([mean] if mean is not None else [])
    high, low = max(levels), min(levels)
    span = (high - low) or 1.0

    def y(v: float) -> float:
        return top + (high - v) / span * (height - top - bottom)

    step = (width - left - 4) / max(1, len(values))
    bars = "".join(f'<rect x="{left + i * step + 1:.1f}" y="{min(y(v), y(0)):.1f}" width="{step - 2:.1f}" '
                   f'height="{abs(y(0) - y(v)):.1f}"><title>hit {i + 1}: {number(v)}</title></rect>'
                   for i, v in enumerate(values))
    axis = (f'<line class="axis" x1="{left}" x2="{width}" y1="{y(0):.1f}" y2="{y(0):.1f}"/>'
            f'<text x="{left - 4}" y="{y(high) + 4:.1f}" text-anchor="end">{number(high)}</text>'
            f'<text x="{left - 4}" y="{y(0) + 4:.1f}" text-anchor="end">0</text>')
    line = ""
    if mean is not None:
        line = (f'<line class="mean" x1="{left}" x2="{width}" y1="{y(mean):.1f}" y2="{y(mean):.1f}"/>'
                f'<text x="{width - 2}" y="{y(mean) - 3:.1f}" text-anchor="end">mean {number(mean)}</text>')
    return (f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="top scores">{axis}{bars}{line}'
            f'<text x="{left}" y="{height - 4}">hits 1–{len(values)}</text></svg>')


def box_style(plan: Plan, size: tuple[int, int], box: tuple[int, int, int, int]) -> str:
    """CSS placing a network-input box over its image (original `size`, height and width), in percent."""
    height, width = size
    y0, x0, y1, x1 = crop_geometry(width, height, plan.info.input_size).to_original(box)
    return (f"top:{100 * y0 / height:.2f}%;left:{100 * x0 / width:.2f}%;"
            f"height:{100 * (y1 - y0) / height:.2f}%;width:{100 * (x1 - x0) / width:.2f}%")


def unit_page(plan: Plan, name: str, unit: int, sizes: dict[int, tuple[int, int]],
              unguided: dict[str, int]) -> str:
    """`sizes`: original (height, width) of the hit images; `unguided`: activations guided backprop could not
    guide in this layer, and how often they ran."""
    layer = plan.layers[name]
    hits = layer.hits
    count = plan.hit_count(name, unit)
    level = layer.level(unit)
    figures = []
    for rank in range(count):
        image_id = int(hits.image[unit, rank])
        b0, b1, b2, b3 = (int(v) for v in hits.box[unit, rank])
        box = box_style(plan, sizes[image_id], (b0, b1, b2, b3))
        path = plan.paths[image_id]
        figures.append(
            f'<figure class="hit"><div class="pair">'
            f'<img class="patch" src="../../{plan.unit_file(name, unit, f"p{rank}")}" alt="patch {rank + 1}">'
            + "".join(f'<img class="patch" src="../../{plan.unit_file(name, unit, plan.method_file(m, rank))}" '
                      f'alt="{esc(m.label)} {rank + 1}" title="{esc(m.label)}">' for m in plan.settings.methods)
            + '</div>'
            f'<img class="map" src="../../{plan.unit_file(name, unit, f"a{rank}")}" '
            f'alt="activation map {rank + 1}" loading="lazy">'
            + (f'<img class="map" src="../../{plan.unit_file(name, unit, f"m{rank}")}" '
               f'alt="above p99 {rank + 1}" loading="lazy">' if level is not None else "") +
            f'<a class="context" href="../../{plan.image_url(image_id)}" title="{esc(path)}">'
            f'<img src="../../{plan.image_file(image_id)}" alt="{esc(path)}" loading="lazy">'
            f'<span class="box" style="{box}"></span></a>'
            f"<figcaption>{rank + 1} · {number(float(hits.value[unit, rank]))}<br>{esc(short(path))}</figcaption>"
            "</figure>")
    mean = None if layer.mean is None or not np.isfinite(layer.mean[unit]) else float(layer.mean[unit])
    units = plan.pages[name]
    position = bisect.bisect_left(units, unit)
    steps = []
    if position > 0:
        steps.append(f'<a rel="prev" href="{units[position - 1]}.html">← unit {units[position - 1]}</a>')
    if position + 1 < len(units):
        steps.append(f'<a rel="next" href="{units[position + 1]}.html">unit {units[position + 1]} →</a>')
    near = nearest_units(plan, name, unit)
    dream = ""
    if unit in plan.dreams.get(name, set()):
        dream = ('<h2>Dream</h2>\n<p>An input optimized to excite this unit (a 1/f Fourier spectrum with '
                 'decorrelated colours, under random jitter, scale and rotation, as lucid).</p>\n'
                 f'<img class="dream" src="../../{plan.unit_file(name, unit, "dream")}" alt="dream of unit {unit}">')
    unguided = unguided or {}
    note = ""
    if unguided:
        names = ", ".join(sorted(unguided))
        note = (f'<p class="note">Guided backprop is not defined for {esc(names)}: gradients pass through them '
                "unchanged, so these maps are only partly guided.</p>")
    body = (f"{crumbs(2, (name, plan.layer_url(name)), (f'unit {unit}', None))}\n"
            f"<h1>{esc(name)} · unit {unit}</h1>\n"
            f'<p>{hits.grid.channels} units in this layer · {esc(rf_text(plan, name))} · '
            f'<span class="steps">{" ".join(steps)}</span></p>\n'
            f"{profile_section(plan, name, unit)}"
            f"<h2>Top {count} images</h2>\n<p>Each hit: the patch the unit sees, its "
            + esc(", ".join(m.label for m in plan.settings.methods))
            + " over it (mid-grey is 0), the unit's activation map over the whole image (dark 0, light its best score)"
            + (f", the image where the map reaches the unit's p99 ({number(level)}), outlined," if level is not None
               else "") + " and the whole image with the patch's box.</p>\n"
            f'<div class="hits">{"".join(figures)}</div>\n{note}\n'
            f"<h2>Scores</h2>\n{score_chart(hits.value[unit, :count], mean)}\n"
            f"<h2>Nearest units</h2>\n<p>Units whose top images overlap most with this one's.</p>\n{near}\n{dream}")
    return document(f"{name} unit {unit} · actindex atlas", body, 2)


def profile_section(plan: Plan, name: str, unit: int) -> str:
    """How often and how strongly the unit fires over the dataset, and for which classes (what the index has)."""
    distribution = plan.layers[name].profile.distribution(unit)
    classes = plan.unit_classes.get(name, {}).get(unit)
    if distribution is None and classes is None:
        return ""
    facts: list[tuple[str, object]] = []
    if distribution is not None:
        facts.append(("fires (> 0) on", f"{100 * distribution.firing_rate:.1f} % of {distribution.count} images"))
        facts += [(f"p{100 * q:g}", number(v)) for q, v in distribution.quantiles.items()]
    table = ""
    if classes is not None:
        index = number(classes.selectivity) if np.isfinite(classes.selectivity) else \
            "– (defined for non-negative class means, as after a ReLU)"
        facts.append(("class selectivity", index))
        rows = "".join(f"<tr><td>{esc(klass)}</td><td>{number(mean)}</td><td>{images}</td></tr>"
                       for klass, mean, images in classes.top)
        table = ('<table class="layers classes"><thead><tr><th>class</th><th>mean score</th><th>images</th></tr>'
                 f"</thead><tbody>{rows}</tbody></table>\n")
    return f"<h2>Over the dataset</h2>\n{definitions(facts)}\n{table}"


def nearest_units(plan: Plan, name: str, unit: int) -> str:
    nearest = plan.nearest
    g = nearest.first[name] + unit
    tiles = []
    for other, shared in zip(nearest.index[g], nearest.count[g], strict=True):
        if other < 0:
            break
        layer, channel = nearest.layer[other], int(nearest.channel[other])
        label = f"{layer} {channel}" if layer != name else str(channel)
        tiles.append(tile(plan, layer, channel, 2, label=f"{label} · {shared} shared"))
    return f'<div class="tiles near">{"".join(tiles)}</div>' if tiles else "<p>No unit shares a top image.</p>"


def short(path: str, limit: int = 28) -> str:
    return path if len(path) <= limit else "…" + path[-(limit - 1):]


def appearances(plan: Plan) -> dict[int, list[tuple[int, str, int]]]:
    """Image id -> (rank, layer, unit) for every unit page that shows it, best rank first."""
    found: dict[int, list[tuple[int, str, int]]] = defaultdict(list)
    for name, units in plan.pages.items():
        image = plan.layers[name].hits.image
        for unit in units:
            for rank, image_id in enumerate(image[unit]):
                if image_id >= 0:
                    found[int(image_id)].append((rank, name, unit))
    return {key: sorted(value, key=lambda t: (t[0], list(plan.layers).index(t[1]), t[2]))
            for key, value in found.items()}


def patch_section(plan: Plan, image_id: int, pages: set[int], sizes: dict[int, tuple[int, int]]) -> str:
    """The image's strongest boxes, each with the patches of other images most like it (one per image)."""
    if plan.patch_links is None:
        return ""
    rows = []
    for number_, link in enumerate(plan.patch_links.get(image_id, []), start=1):
        path, style = plan.paths[image_id], box_style(plan, sizes[image_id], link.box)
        cells = [f'<figure class="thumb"><span class="context"><img src="../{plan.image_file(image_id)}" '
                 f'alt="{esc(path)}" loading="lazy"><span class="box" style="{style}"></span></span>'
                 f'<figcaption>box {number_} at ({link.y}, {link.x})</figcaption></figure>']
        for other, score, box in link.hits:
            picture = (f'<img src="../{plan.image_file(other)}" alt="{esc(plan.paths[other])}" loading="lazy">'
                       f'<span class="box" style="{box_style(plan, sizes[other], box)}"></span>')
            caption = f"<figcaption>{score:.3f}<br>{esc(short(plan.paths[other]))}</figcaption>"
            inner = f'<a class="context" href="{other}.html">{picture}</a>' if other in pages else \
                f'<span class="context">{picture}</span>'
            cells.append(f'<figure class="thumb">{inner}{caption}</figure>')
        rows.append(f'<div class="patches" id="box{number_}">{"".join(cells)}</div>')
    if not rows:
        return ""
    return (f"<h2>Parts like these elsewhere</h2>\n<p>The image's strongest positions of "
            f"'{esc(plan.patch_layer)}' (longest activation vectors), each with the patches of other images whose "
            "vectors are nearest by cosine similarity, one per image; boxes are receptive fields "
            "(<code>actindex similar INDEX --id N --box …</code> searches any box).</p>\n" + "\n".join(rows) + "\n")


def image_page(plan: Plan, image_id: int, shown_in: list[tuple[int, str, int]], pages: set[int],
               sizes: dict[int, tuple[int, int]] | None = None) -> str:
    path = plan.paths[image_id]
    label = int(plan.labels[image_id])
    klass = f" · class {esc(plan.classes[label])}" if 0 <= label < len(plan.classes) else ""
    units = "".join(tile(plan, name, unit, 1, label=f"{name} {unit} · #{rank + 1}")
                    for rank, name, unit in shown_in[:60])
    more = f"<p>… and {len(shown_in) - 60} more units.</p>" if len(shown_in) > 60 else ""
    if plan.neighbours is None:
        similar = ("<p>This index has no similarity index; build one with <code>actindex faiss INDEX</code> and "
                   "rebuild the atlas.</p>")
    else:
        cells = []
        for other, score in plan.neighbours.get(image_id, []):
            picture = f'<img src="../{plan.image_file(other)}" alt="{esc(plan.paths[other])}" loading="lazy">'
            caption = f"<figcaption>{score:.3f}<br>{esc(short(plan.paths[other]))}</figcaption>"
            if other in pages:
                cells.append(f'<figure class="thumb"><a href="{other}.html">{picture}</a>{caption}</figure>')
            else:
                cells.append(f'<figure class="thumb">{picture}{caption}</figure>')
        similar = (f"<p>Nearest by cosine similarity of '{esc(plan.similarity_layer)}' activations.</p>"
                   f'<div class="neighbours">{"".join(cells)}</div>')
    body = (f"{crumbs(1, ('images', 'images/index.html'), (short(path, 60), None))}\n<h1>{esc(path)}</h1>\n"
            f"<p>image {image_id}{klass}</p>\n"
            f'<img class="whole" src="../{plan.image_file(image_id)}" alt="{esc(path)}">\n'
            f"<h2>Similar images</h2>\n{similar}\n{patch_section(plan, image_id, pages, sizes or {})}"
            "<h2>Units it excites most</h2>\n"
            f'<div class="tiles">{units}</div>\n{more}')
    return document(f"{path} · actindex atlas", body, 1)


def images_page(plan: Plan) -> str:
    cells = "".join(f'<figure class="thumb"><a href="{i}.html"><img src="../{plan.image_file(i)}" '
                    f'alt="{esc(plan.paths[i])}" loading="lazy"></a><figcaption>{esc(short(plan.paths[i]))}'
                    "</figcaption></figure>" for i in plan.image_pages)
    body = (f"{crumbs(1, ('images', None))}\n<h1>Images</h1>\n<p>{len(plan.image_pages)} images that are a top "
            f'hit of a unit with a page.</p>\n<div class="neighbours">{cells}</div>')
    return document("images · actindex atlas", body, 1)


def write_pages(plan: Plan, unguided: dict[str, dict[str, int]], sizes: dict[int, tuple[int, int]]) -> int:
    """Every page and the static files, with what the pictures' tasks found (`unguided` per layer, the images'
    original `sizes`); returns how many files were written."""
    site = plan.site
    static = resources.files("actindex.query.atlas") / "static"
    for name in ("atlas.css", "atlas.js"):
        atomic_write(site / name, (static / name).read_bytes())
    atomic_write(site / "index.html", front_page(plan).encode())
    written = 3
    for name in plan.layers:
        atomic_write(site / plan.layer_url(name), layer_page(plan, name).encode())
        written += 1
        for unit in plan.pages.get(name, ()):
            page = unit_page(plan, name, unit, sizes, unguided.get(name, {}))
            atomic_write(site / plan.unit_url(name, unit), page.encode())
            written += 1
    shown = appearances(plan)
    pages = set(plan.image_pages)
    for image_id in plan.image_pages:
        page = image_page(plan, image_id, shown.get(image_id, []), pages, sizes)
        atomic_write(site / plan.image_url(image_id), page.encode())
        written += 1
    atomic_write(site / "images" / "index.html", images_page(plan).encode())
    return written + 1


def site_size(site: Path) -> tuple[int, int, int]:
    """(files, bytes of pages, bytes of pictures) under the site."""
    files = pages = pictures = 0
    for path in site.rglob("*"):
        if path.is_file():
            files += 1
            if path.suffix in (".html", ".css", ".js", ".json"):
                pages += path.stat().st_size
            else:
                pictures += path.stat().st_size
    return files, pages, pictures
