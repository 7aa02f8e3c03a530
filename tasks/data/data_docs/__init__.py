"""Great Expectations Data Docs that render with no network (issue #11).

GX's pages load jQuery, Bootstrap, bootstrap-table, Font Awesome and vega from CDNs; offline its
index lists no validation at all, because bootstrap-table fills that table in the browser. These
views render the same documents with every table written out in the HTML
(templates/bootstrap_table.j2), a stylesheet of their own (templates/data_docs_custom_styles.css),
and no tag or style that fetches from another host. GX uses them through its site configuration
(the ``view`` of the index builder and of each site section, tasks/data/contract.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from great_expectations.render.view import DefaultJinjaIndexPageView, DefaultJinjaPageView
from jinja2 import ChoiceLoader, FileSystemLoader

TEMPLATES = Path(__file__).parent / "templates"
# Tags that fetch from another host when the page loads (links <a href> only do when clicked).
_REMOTE_TAG = re.compile(
    r"""<script\b[^>]*\bsrc=["']?https?://[^>]*>\s*</script>"""
    r"""|<link\b[^>]*\bhref=["']?https?://[^>]*>"""
    r"""|<img\b[^>]*\bsrc=["']?https?://[^>]*>""",
    re.IGNORECASE,
)
_REMOTE_CSS_URL = re.compile(r"""url\(\s*['"]?https?://[^)]*\)""", re.IGNORECASE)


def without_remote_assets(html: str) -> str:
    """``html`` with every script, stylesheet, image and CSS ``url()`` from another host taken out."""
    return _REMOTE_CSS_URL.sub("none", _REMOTE_TAG.sub("", html))


class _Offline:
    """Our templates first, GX's behind them; remote assets removed from what they render."""

    env: Any

    def _offline_loader(self) -> None:
        self.env.loader = ChoiceLoader([FileSystemLoader(TEMPLATES), self.env.loader])

    def render(self, document: Any, template: Any = None, **kwargs: Any) -> str:
        return without_remote_assets(super().render(document, template, **kwargs))  # type: ignore[misc]


class OfflinePageView(_Offline, DefaultJinjaPageView):
    """A validation result or expectation suite page."""

    def __init__(self, custom_styles_directory: Any = None, custom_views_directory: Any = None) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        self._offline_loader()


class OfflineIndexPageView(_Offline, DefaultJinjaIndexPageView):
    """The index: every validation run and suite, listed in the HTML itself."""

    def __init__(self, custom_styles_directory: Any = None, custom_views_directory: Any = None) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        self._offline_loader()
