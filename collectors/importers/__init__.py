"""Importers that turn public microservice datasets into kubeworld's Parquet tables."""

from collectors.importers.nezha import import_nezha, import_nezha_all, nezha_days

IMPORTERS = {"nezha": import_nezha_all}

__all__ = ["IMPORTERS", "import_nezha", "import_nezha_all", "nezha_days"]
