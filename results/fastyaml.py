"""PyYAML's safe loader and dumper backed by libyaml when it is there (several times faster, the
same documents), else the pure-Python ones: the one place the project chooses them."""

from __future__ import annotations

import yaml

SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
