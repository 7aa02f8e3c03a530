"""Build .dvc/plots/offline.html: the page `dvc plots show` fills, with its charting libraries inside.

DVC's own page loads vega, vega-lite and vega-embed from a CDN, so offline it stays blank. This
template carries the same versions (those dvc-render's VegaRenderer names) inlined, and no
``{scripts}`` placeholder, so DVC adds no CDN tags; `.dvc/config` points `plots.html_template` at it.
The libraries come from the npm registry's packages, with their BSD-3-Clause licenses kept:

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    python docs/offline_plots_template.py vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz
"""

from __future__ import annotations

import argparse
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".dvc" / "plots" / "offline.html"
# package -> its minified browser build inside the npm tarball, in the order a page must load them
BUILDS = {"vega": "package/build/vega.min.js", "vega-lite": "package/build/vega-lite.min.js",
          "vega-embed": "package/build/vega-embed.min.js"}  # fmt: skip

PAGE = """<!DOCTYPE html>
<!-- `dvc plots show` renders offline with this page (.dvc/config: plots.html_template).
     Built by docs/offline_plots_template.py: {versions}, inlined; licenses at the end. -->
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
{licenses}
"""


def member(tgz: Path, name: str) -> str:
    with tarfile.open(tgz) as archive:
        extracted = archive.extractfile(name)
        if extracted is None:
            raise SystemExit(f"{tgz} has no file {name}")
        return extracted.read().decode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tarballs", nargs=3, type=Path, help="vega, vega-lite and vega-embed .tgz from `npm pack`")
    args = parser.parse_args()
    by_package = {tgz.name.rsplit("-", 1)[0]: tgz for tgz in args.tarballs}
    scripts, licenses, versions = [], [], []
    for package, build in BUILDS.items():
        tgz = by_package[package]
        code = member(tgz, build)
        if "</script" in code or "{plot_divs}" in code or "{refresh_tag}" in code:
            raise SystemExit(f"{tgz}: {build} cannot be inlined as it is")
        versions.append(tgz.name.removesuffix(".tgz").replace(f"{package}-", f"{package} "))
        scripts.append(f"    <script>{code}</script>")
        licenses.append(f"<!-- {package}: {member(tgz, 'package/LICENSE').strip()} -->")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    page = PAGE.format(versions=", ".join(versions), scripts="\n".join(scripts), licenses="\n".join(licenses))
    OUT.write_text(page)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
