"""Pumice: a light board-test lab in the LAVA tradition.

The base install is the agent (the dispatcher that runs jobs on boards); the
``master`` extra adds the server side, ``postgres`` the PostgreSQL driver and
``dev`` the test and lint tools.
"""

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="pumice",
    version="0.1.0",
    description="A light board-test lab that runs LAVA job files",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["agent", "agent.*", "results", "results.*", "master", "master.*",
                                    "sitegen", "sitegen.*"]),
    package_data={
        "agent": ["testshell/*"],
        "sitegen": ["templates/*", "static/*"],
    },
    data_files=[("share/pumice/device-types", glob("device-types/*.jinja2"))],
    install_requires=[
        "pyzmq>=25",
        "pyyaml>=6",
        "pyserial>=3.5",
        "pexpect>=4.8",
        "voluptuous>=0.13",
    ],
    extras_require={
        "master": ["bottle>=0.12.25", "peewee>=3.17", "jinja2>=3.1", "waitress>=2.1"],
        "postgres": ["psycopg2-binary>=2.9"],
        "dev": ["pytest>=7", "pytest-timeout>=2", "ruff>=0.5", "lavacli>=2.0", "hypothesis>=6.80", "aiosmtpd>=1.4",
                # 1.0.3 (Debian 12) puts a network_mode: host service on a bridge too
                "podman-compose>=1.1"],
    },
    entry_points={
        "console_scripts": [
            "pumice-run = agent.run:cli",
            "pumice-agent = agent.daemon:main",
            "pumice-master = master.cli:main",
            "pumice = master.client:main",
            "pumice-site = sitegen.cli:main",
        ]
    },
)
