"""sitegen: the static results site (job pages, paged logs, suite histories, bundles) built from the store.

Public entry points: :func:`build_site` (``pumice-site build``), :func:`publish_job` (called by the master
when a job finishes) and :func:`results.imports.import_bundle` (bundle upload).
"""

from sitegen.build import BuildReport, SiteConfig, build_site, publish_job, publish_lab

__all__ = ["BuildReport", "SiteConfig", "build_site", "publish_job", "publish_lab"]
