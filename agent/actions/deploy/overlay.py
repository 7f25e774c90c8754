"""The test overlay: fetch the job's test definitions and build ``/lava-<job id>`` for the board."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml

from agent.errors import InfrastructureError, JobError, TestError
from agent.overlay import DEFAULT_RESULTS_DIR, TestDefinition, append_to_ramdisk, build_overlay
from agent.pipeline import Action, LevelOnly
from agent.policy import Access, PolicyRefusal, host_of, inside, scheme_of, target
from agent.timeout import Deadline
from results.bounded import DEFAULT_LIMITS, LimitExceeded, load_data


def results_dir(job) -> str:
    """Where the overlay sits on the board: the device's ``lava_test_results_dir`` (``/lava-%s``)."""
    posix = job.device.constant("posix", {})
    return str(posix.get("lava_test_results_dir") or DEFAULT_RESULTS_DIR)


class OverlayAction(Action):
    """Build the test overlay: the test shell scripts and every test definition of the tests
    that follow this deploy."""

    name = "lava-overlay"
    description = "add lava scripts during deployment for test shell use"
    summary = "overlay the lava support scripts"

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        self.stages = self.context.tests_after
        # LAVA's children, in LAVA's order, so that the levels below line up with LAVA's
        if any("ssh" in method for method in self.device.deploy_methods):
            pipeline.add(SshAuthorize())
        pipeline.add(VlandOverlayAction())
        pipeline.add(MultinodeOverlayAction())
        pipeline.add(TestDefinitionAction(self.stages))
        pipeline.add(CompressOverlay(self.stages))
        pipeline.add(PersistentNFSOverlay())


class SshAuthorize(LevelOnly):
    """LAVA's ssh-authorize, on a device with an ssh deploy method."""

    name = "ssh-authorize"
    description = "include public key in overlay and authorize root user"
    summary = "add public key to authorized_keys"
    reason = "Pumice does not deploy over ssh"


class VlandOverlayAction(LevelOnly):
    """LAVA's lava-vland-overlay."""

    name = "lava-vland-overlay"
    description = "Populate specific vland scripts for tests to lookup vlan data."
    summary = "Add files detailing vlan configuration."
    reason = "the job uses no lava-vland protocol"


class MultinodeOverlayAction(LevelOnly):
    """LAVA's lava-multinode-overlay."""

    name = "lava-multinode-overlay"
    description = "add lava scripts during deployment for multinode test shell use"
    summary = "overlay the lava multinode scripts"
    reason = "the job uses no lava-multinode protocol"


class PersistentNFSOverlay(LevelOnly):
    """LAVA's persistent-nfs-overlay."""

    name = "persistent-nfs-overlay"
    description = "unpack overlay into persistent NFS"
    summary = "add test overlay to NFS"
    reason = "the job has no persistent NFS root"


class TestDefinitionAction(Action):
    """Fetch each test definition (inline, git, url) of the following test blocks."""

    name = "test-definition"
    description = "load test definitions into image"
    summary = "loading test definitions"

    def __init__(self, stages: list[tuple[int, dict]]) -> None:
        super().__init__()
        self.stages = stages
        #: the name of each definition, in order
        self.names: list[str] = []

    def validate(self) -> None:
        super().validate()
        # LAVA's rule: the overlay holds every definition of the tests it serves by name
        repeated = sorted({name for name in self.names if self.names.count(name) > 1})
        if repeated:
            self.errors.append(f"test definition names need to be unique (as in LAVA): {', '.join(repeated)} "
                               "appear more than once in the tests after this deploy")

    def populate(self, parameters: dict) -> None:
        pipeline = self.child_pipeline(parameters)
        kinds = {"inline": InlineRepoAction, "git": GitRepoAction, "url": UrlRepoAction}
        for stage, block in self.stages:
            for index, definition in enumerate(block.get("definitions") or []):
                kind = definition.get("from")
                if kind not in kinds:
                    raise JobError(f"test definition {definition.get('name')!r}: unknown source "
                                   f"{kind!r}; known: {', '.join(kinds)}")
                pipeline.add(kinds[kind](stage, index, definition))
                self.names.append(definition.get("name"))
                pipeline.add(TestOverlayAction())
                pipeline.add(TestInstallAction())
                pipeline.add(TestRunnerAction())


class DoneByCompressOverlay(LevelOnly):
    """One of LAVA's three per-definition overlay steps: compress-overlay writes what they write."""

    reason = "compress-overlay writes this definition's files"


class TestOverlayAction(DoneByCompressOverlay):
    """LAVA's test-overlay: a definition's run directory."""

    name = "test-overlay"
    description = "overlay test support files onto image"
    summary = "applying LAVA test overlay"


class TestInstallAction(DoneByCompressOverlay):
    """LAVA's test-install-overlay: a definition's install.sh."""

    name = "test-install-overlay"
    description = "overlay dependency installation support files onto image"
    summary = "applying LAVA test install scripts"


class TestRunnerAction(DoneByCompressOverlay):
    """LAVA's test-runscript-overlay: a definition's run.sh."""

    name = "test-runscript-overlay"
    description = "overlay run script onto image"
    summary = "applying LAVA test run script"


class RepoAction(Action):
    """Common part of the repository actions: what they produce is a TestDefinition."""

    timeout_exception = InfrastructureError

    def __init__(self, stage: int, index: int, params: dict) -> None:
        super().__init__()
        self.stage = stage
        self.index = index
        self.params = params

    def folder(self) -> Path:
        path = self.job.workdir / "tests" / str(self.stage) / f"{self.index}_{self.params['name']}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load(self, source: Path) -> dict:
        """Read the definition YAML at ``path`` inside ``source`` (never outside it: a ``path`` with
        ``..`` or a symlink to a file of the worker is refused), within the limits of what users send."""
        path = Path(inside(source, self.params["path"], f"test definition {self.params['name']!r}: path"))
        try:
            if path.stat().st_size > DEFAULT_LIMITS.max_bytes:
                raise JobError(f"test definition {self.params['name']!r}: {self.params['path']} is "
                               f"{path.stat().st_size} bytes; at most {DEFAULT_LIMITS.max_bytes} (limit max_bytes)")
            data = load_data(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobError(f"test definition {self.params['name']!r}: {self.params['path']!r} not found in "
                           f"{self.params['repository']}") from None
        except LimitExceeded as exc:
            raise JobError(f"test definition {self.params['name']!r}: {self.params['path']} is over a limit: "
                           f"{exc}") from None
        except yaml.YAMLError as exc:
            raise JobError(f"test definition {self.params['name']!r}: invalid YAML in "
                           f"{self.params['path']}: {exc}") from None
        if not isinstance(data, dict):
            raise JobError(f"test definition {self.params['name']!r}: {self.params['path']} is not a mapping")
        return data

    def keep(self, definition: dict, source: Path | None) -> None:
        test = TestDefinition(
            name=self.params["name"], definition=definition, source=source,
            path=self.params.get("path"),
            parameters=dict(self.params.get("parameters") or self.params.get("params") or {}),
            lava_signal=self.params.get("lava-signal", "stdout"),
            skip_install=list(self.params.get("skip_install") or []))
        self.job.data.testdefs.setdefault(self.stage, []).append((self.index, test))
        steps = len(((definition.get("run") or {}).get("steps")) or [])
        self.logger.info(f"{self.params['name']}: {steps} run steps from {self.params['from']}")


class InlineRepoAction(RepoAction):
    """A test definition written inside the job."""

    name = "inline-repo-action"
    description = "apply inline test definition to the test image"
    summary = "extract inline test definition"

    def validate(self) -> None:
        if not isinstance(self.params.get("repository"), dict):
            self.errors.append(f"{self.params.get('name')}: an inline repository is a test definition mapping")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        self.keep(self.params["repository"], None)
        return connection


class GitRepoAction(RepoAction):
    """A test definition from a git repository, cloned on the worker."""

    name = "git-repo-action"
    description = "apply git repository of tests to the test image"
    summary = "clone git test repo"

    def validate(self) -> None:
        self.require_tool("git", why=f"test definition {self.params.get('name')!r} comes from git")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        folder = self.folder()
        command = ["git", *self._pinned(), "clone", "--quiet"]
        if not self.params.get("revision") and not self.params.get("history", True):
            command += ["--depth", "1"]
        if self.params.get("branch"):
            command += ["--branch", self.params["branch"]]
        command += ["--", self.params["repository"], str(folder)]
        self._git(command, deadline)
        if self.params.get("revision"):
            self._git(["git", "-C", str(folder), "checkout", "--quiet", self.params["revision"]], deadline)
        commit = self._git(["git", "-C", str(folder), "rev-parse", "HEAD"], deadline).strip()
        self.results.update({"repository": self.params["repository"], "commit": commit,
                             "path": self.params["path"]})
        if not self.params.get("history", True):
            shutil.rmtree(folder / ".git", ignore_errors=True)
        self.keep(self.load(folder), folder)
        return connection

    def _pinned(self) -> list[str]:
        """Apply the worker's file policy to the repository before cloning (PolicyRefusal): a local
        repository must be under an allowed directory; a host is resolved now and each address
        checked, and for http(s) git is told to use those addresses (so a second lookup cannot
        answer with another). Returns git's ``-c`` options for that."""
        access = Access("git", self.params["repository"])
        refusal = self.job.policy.refusal(access, resolve=True)
        if refusal:
            raise PolicyRefusal(refusal)
        addresses = self.job.policy.resolve_host(access)
        where = host_of(access)
        if not addresses or where is None or scheme_of(access.location) not in ("http", "https"):
            return []
        listed = ",".join(f"[{a}]" if a.version == 6 else str(a) for a in addresses)
        return ["-c", f"http.curloptResolve={where[0]}:{where[1]}:{listed}"]

    def _git(self, command: list[str], deadline: Deadline) -> str:
        import subprocess

        self.logger.debug(" ".join(command))
        # git's transports: never a remote helper (ext:: runs commands); local paths only when the
        # policy allowed this one (checked in _pinned)
        local = target(Access("git", self.params["repository"]))
        allowed = "http:https:git:ssh" + (":file" if local and local.file else "")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=deadline.remaining(),
                                  env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin",
                                       "GIT_ALLOW_PROTOCOL": allowed})
        except subprocess.TimeoutExpired:
            raise self.timed_out(" ".join(command)) from None
        if done.returncode:
            raise InfrastructureError(f"{' '.join(command[:3])} failed for {self.params['repository']}: "
                                      f"{done.stderr.strip()}")
        return done.stdout


class UrlRepoAction(RepoAction):
    """A test definition (or a tar archive holding one) fetched from a URL."""

    name = "url-repo-action"
    description = "apply a single test file to the test image"
    summary = "download file test"

    def validate(self) -> None:
        from agent.fetch import SCHEMES

        scheme = scheme_of(self.params.get("repository") or "")
        if scheme not in SCHEMES:
            self.errors.append(f"test definition {self.params.get('name')!r}: unsupported URL scheme {scheme!r} "
                               f"in {self.params.get('repository')!r}; known: {', '.join(SCHEMES)}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        import tarfile

        from agent.fetch import HTTPStatusError, open_url

        folder = self.folder()
        url = self.params["repository"]
        archive = folder.parent / f".{folder.name}.download"
        try:
            with open_url(url, self.job.policy, timeout=deadline.within(30.0)) as response, \
                    open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
        except HTTPStatusError as exc:
            raise JobError(f"cannot download test definition {url}: HTTP {exc.code}") from None
        except OSError as exc:
            raise InfrastructureError(f"cannot download test definition {url}: {exc}") from None
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter="data")
        else:
            where = Path(inside(folder, self.params["path"], f"test definition {self.params['name']!r}: path"))
            where.parent.mkdir(parents=True, exist_ok=True)
            archive.replace(where)
        archive.unlink(missing_ok=True)
        self.keep(self.load(folder), folder)
        return connection


class CompressOverlay(Action):
    """Write ``/lava-<job id>``: scripts, environment, one directory per test run."""

    name = "compress-overlay"
    description = "Create a lava overlay tarball and store alongside the job"
    summary = "Compress the lava overlay files"
    timeout_exception = InfrastructureError

    def __init__(self, stages: list[tuple[int, dict]]) -> None:
        super().__init__()
        self.stages = stages

    def run(self, connection: Any, deadline: Deadline) -> Any:
        fetched = self.job.data.testdefs
        count = 1 + max((stage for stage, _ in self.stages), default=-1)
        stages: list[list[TestDefinition]] = [[] for _ in range(count)]
        for stage, tests in fetched.items():
            stages[stage] = [test for _, test in sorted(tests, key=lambda item: item[0])]
        root = self.job.workdir / "overlay"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        environment = {**environment_of(self.job), "LAVA_JOB_ID": self.job.job_id}
        try:
            build_overlay(root, self.job.job_id, stages, environment, results_dir=results_dir(self.job))
        except (ValueError, KeyError) as exc:
            raise TestError(f"cannot build the test overlay: {exc}") from None
        self.job.data.overlay_root = root
        self.logger.debug(f"overlay for {sum(map(len, stages))} test definitions in {root}")
        return connection


class AppendOverlays(Action):
    """Append the test overlay to a cpio ramdisk (``overlays: {lava: true}``)."""

    name = "append-overlays"
    description = "append overlays to an image"
    summary = "append overlays to an image"
    timeout_exception = InfrastructureError

    def __init__(self, key: str, params: dict) -> None:
        super().__init__()
        self.key = key
        self.params = params

    def validate(self) -> None:
        if self.params.get("format") != "cpio.newc":
            self.errors.append(f"images.{self.key}: the lava overlay can only be appended to a "
                               f"'format: cpio.newc' image, not {self.params.get('format')!r}")

    def run(self, connection: Any, deadline: Deadline) -> Any:
        root = self.job.data.overlay_root
        if root is None:
            self.logger.warning(f"{self.key}: no test overlay to append (no test action follows)")
            return connection
        ramdisk = self.job.data.downloads[self.key]
        before = ramdisk.stat().st_size
        append_to_ramdisk(ramdisk, root)
        self.logger.info(f"{self.key}: test overlay appended ({ramdisk.stat().st_size - before} bytes)")
        return connection


class DeployDeviceEnvironment(Action):
    """Collect the job's and the device's environment for the test shell."""

    name = "deploy-device-env"
    description = "deploy device environment"
    summary = "deploy device environment"

    def run(self, connection: Any, deadline: Deadline) -> Any:
        names = ", ".join(sorted(environment_of(self.job))) or "none"
        self.logger.debug(f"device environment: {names}")
        return connection


def environment_of(job) -> dict[str, str]:
    """The variables exported on the board: the device's ``environment`` then the job's."""
    env: dict[str, str] = {}
    for source in (job.device.environment, job.definition.get("environment")):
        if isinstance(source, dict):
            env.update({str(k): str(val) for k, val in source.items()})
    return env
