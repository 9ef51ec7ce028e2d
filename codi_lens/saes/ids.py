"""One name for one SAE feature across every table: ``site/feature``.

A feature id is its SAE's site id and the feature's index, ``thought.3.hook_hidden/417`` or
``blocks.1.hook_resid_post@3/12``. Every table the feature commands write carries it in a ``feature_id``
column, so screen effects, pathways, token associations and top examples join on one column.

The id names a site, not an SAE file, so the feature commands take one SAE per site
(:func:`saes_by_site` refuses two at one site by name). :func:`audit_feature_ids` checks that the ids
of a set of tables exist in a set of SAEs and names the orphans.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd
from sae_lens import SAE

from codi_lens.core.sites import Site
from codi_lens.saes.io import SAEError, sae_site

#: The column every feature table joins on.
FEATURE_ID = "feature_id"


def feature_id(site: Site | str, feature: int) -> str:
    """``thought.3.hook_hidden/417``: the site's id and the feature index."""
    return f"{site.id if isinstance(site, Site) else site}/{int(feature)}"


def parse_feature_id(text: str) -> tuple[Site, int]:
    """The inverse of :func:`feature_id`; :class:`SAEError` names a malformed id."""
    site, slash, index = text.rpartition("/")
    if not slash or not index.isdigit():
        raise SAEError(f"{text!r} is not a feature id (site/feature, e.g. thought.3.hook_hidden/417)")
    try:
        return Site.parse(site), int(index)
    except ValueError as exc:
        raise SAEError(f"{text!r}: {exc}") from None


def saes_by_site(saes: Mapping[str, SAE]) -> dict[str, SAE]:
    """The SAEs keyed by their site id (``thought.3.hook_hidden``), in site order. Two SAEs at one site
    (say a top-k and a standard one) would give two features one id: refused, naming both; pick one with
    the command's ``--sae-ids``."""
    by_site: dict[str, str] = {}
    for sae_id, sae in saes.items():
        site = sae_site(sae).id
        if site in by_site:
            raise SAEError(
                f"two SAEs at {site}: {by_site[site]!r} and {sae_id!r}; a feature id names a site, so pick one "
                "(--sae-ids)"
            )
        by_site[site] = sae_id
    return {site: saes[by_site[site]] for site in sorted(by_site, key=lambda s: Site.parse(s))}


def audit_feature_ids(tables: Mapping[str, pd.DataFrame], saes: Mapping[str, SAE]) -> pd.DataFrame:
    """Every feature id of ``tables`` (name -> a table with a ``feature_id`` column) that names no feature
    of ``saes`` (any keys; each SAE's site is read from its metadata): one row per orphan with ``table``,
    ``feature_id`` and ``reason`` (``no SAE at site ...``, ``feature N >= d_sae M``, ``malformed``, or
    ``no feature_id column``). Empty when every id resolves."""
    widths = {sae_site(sae).id: sae.cfg.d_sae for sae in saes.values()}
    rows = []
    for name, table in tables.items():
        if FEATURE_ID not in table.columns:
            rows.append({"table": name, FEATURE_ID: None, "reason": "no feature_id column"})
            continue
        for text in sorted(set(table[FEATURE_ID].dropna())):
            try:
                site, index = parse_feature_id(text)
            except SAEError:
                rows.append({"table": name, FEATURE_ID: text, "reason": "malformed"})
                continue
            if site.id not in widths:
                rows.append({"table": name, FEATURE_ID: text, "reason": f"no SAE at site {site.id}"})
            elif index >= widths[site.id]:
                rows.append({"table": name, FEATURE_ID: text, "reason": f"feature {index} >= d_sae {widths[site.id]}"})
    return pd.DataFrame(rows, columns=["table", FEATURE_ID, "reason"])
