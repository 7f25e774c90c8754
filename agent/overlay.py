"""The test overlay: the test shell helpers and the job's test definitions, laid out for the board.

LAVA puts a "test overlay" on the board before a test action runs; job files and test definitions
written for LAVA expect its layout, which Pumice keeps. Under ``/lava-<job id>`` on the board
(the device constant ``lava_test_results_dir``)::

    bin/                               the helpers of agent/testshell (lava-test-case & co), 0755
    environment                        ``export K='V'`` lines: the job's and device's environment
    <stage>/lava-test-runner.conf      the test directories of test action <stage>, one a line
    <stage>/tests/<n>_<name>/          one test definition: its files, run.sh, install.sh, uuid,
                                       testdef.yaml
    <stage>/results/<n>_<name>/        its LAVA_RESULT_DIR (empty until the test run writes in it)

``<n>`` counts the test definitions of the whole job from 0, across test actions, as LAVA does:
``<n>_<name>`` is the test run's name (``TESTRUN_ID``) and so the suite name of its results.
The agent types :func:`stage_command` at the board's prompt to run one test action.

Stdlib only: the overlay is built on the agent, next to the board.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import JobError

#: where the helper scripts live in the source tree (installed as package data)
TESTSHELL_DIR = Path(__file__).resolve().parent / "testshell"

#: the device constant's default, ``lava_test_results_dir`` in LAVA device configurations
DEFAULT_RESULTS_DIR = "/lava-{job_id}"

# Patterns as text: re compiles each when first used (and caches it), not every pumice-run start.
#: a test definition's name, as LAVA's job schema allows it
_NAME = r"[-_a-zA-Z0-9.]+"
#: a shell variable name
_VARIABLE = r"[A-Za-z_][A-Za-z0-9_]*"
#: text that is, or would be traced as, a console signal
_SIGNAL_TEXT = r"LAVA_SIGNAL_|LAVA_TEST_RUNNER"
#: a positional parameter ($1, $2...) in a step that hands a command to a helper
_POSITIONAL = r"\$(\d+)\b"
#: a step's call of lava-test-case with a literal TEST_CASE_ID (no expansion, quote or glob in it),
#: at the start of a command: the ID's result directory can be made with the overlay
_LITERAL_CASE = r"(?:^|[;&|({]|\bthen|\bdo|\belse)\s*lava-test-case\s+([A-Za-z0-9_.+:@%,-]+)(?=\s|$)"

#: the mtime of every entry of the cpio archive, so that the same tree gives the same bytes
CPIO_MTIME = 0
#: the first four bytes of a U-Boot legacy image (mkimage), big-endian
_UIMAGE_MAGIC = b"\x27\x05\x19\x56"


@dataclass
class TestDefinition:
    """One test definition of a test action, ready to be laid out on the board."""

    __test__ = False  # not a pytest test class, despite the name

    #: the job's ``name:`` of the definition, e.g. "smoke-tests-inline"
    name: str
    #: the parsed "Lava-Test Test Definition 1.0": metadata, install, run.steps, parse, params
    definition: dict
    #: a local directory (a git checkout, an unpacked url/tar) copied into the test directory
    source: Path | None = None
    #: the definition's path inside ``source`` (e.g. "ubuntu/smoke-tests-basic.yaml"); for an
    #: inline definition (no source), where to write it in the test directory, as LAVA does
    path: str | None = None
    #: the job's ``parameters:`` (LAVA also reads ``params:``: merge those in here); they override
    #: the definition's ``params:``
    parameters: dict = field(default_factory=dict)
    #: filled by build_overlay if empty: "<job id>_<stage>.<n>"
    uuid: str = ""
    #: filled by build_overlay: the test run name, "<n>_<name>" (the suite of its results)
    testrun_id: str = ""
    #: the job's ``lava-signal:``: "stdout", or "kmsg" to send the signals to the kernel log
    lava_signal: str = "stdout"
    #: the job's ``skip_install:`` ("steps" or "all" drop install.sh; the rest is never installed)
    skip_install: list[str] = field(default_factory=list)


def _warning(message: str, *args: object) -> None:
    """Warn on ``pumice.overlay`` (logging is imported only then: it is slow to import)."""
    import logging

    logging.getLogger("pumice.overlay").warning(message, *args)


def results_path(job_id: str, results_dir: str = DEFAULT_RESULTS_DIR) -> str:
    """The overlay's path on the board: ``results_dir`` with the job id put in.

    Accepts LAVA's ``%s`` form (``/lava-%s``, as device configurations spell it) and ``{job_id}``.
    """
    if "%s" in results_dir:
        path = results_dir.replace("%s", str(job_id))
    else:
        path = results_dir.replace("{job_id}", str(job_id))
    if not path.startswith("/") or path.rstrip("/") == "":
        raise JobError(
            f"lava_test_results_dir {results_dir!r}: must be an absolute directory on the board, e.g. '/lava-%s'"
        )
    return path.rstrip("/")


def stage_command(job_id: str, stage: int, results_dir: str = DEFAULT_RESULTS_DIR) -> str:
    """The command the agent types at the board's prompt to run test action ``stage``.

    E.g. ``/lava-12/bin/lava-test-runner /lava-12/0``; its last line of output is
    ``<LAVA_TEST_RUNNER EXIT>``.
    """
    base = results_path(job_id, results_dir)
    return f"{base}/bin/lava-test-runner {base}/{stage}"


def sh_quote(value: str) -> str:
    """``value`` as one single-quoted sh word that the shell reads back unchanged.

    Single quotes keep everything literal (``$``, backquotes, backslashes, newlines); a single
    quote itself is closed, escaped and reopened. NUL cannot be passed to a shell at all.
    """
    if "\0" in value:
        raise JobError(f"{value!r}: a NUL character cannot be passed to the board's shell")
    return "'" + value.replace("'", "'\\''") + "'"


def parameter_value(value: object) -> str:
    """A job or definition parameter as the test sees it: LAVA's conversion, quirks kept.

    LAVA writes ``NAME='%s'`` with every false value (None, false, 0, "", empty list) as the empty
    string and anything else through ``str()`` (so ``true`` arrives as ``True``). Test definitions
    written for LAVA test these values, so Pumice gives them the same ones.
    """
    if not value:
        return ""
    return str(value)


def flatten_environment(data: object, prefix: str = "") -> dict[str, str]:
    """Nested environment data as flat shell variables, LAVA's way.

    Dictionary keys and list indexes join with ``_`` (``{"A": {"B": [1]}}`` gives ``A_B_0=1``);
    booleans become 1/0 and None the empty string.
    """
    flat: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            flat.update(flatten_environment(value, f"{prefix}_{key}" if prefix else str(key)))
    elif isinstance(data, list | tuple):
        for index, value in enumerate(data):
            flat.update(flatten_environment(value, f"{prefix}_{index}" if prefix else str(index)))
    elif isinstance(data, bool):
        flat[prefix] = "1" if data else "0"
    elif data is None:
        flat[prefix] = ""
    else:
        flat[prefix] = str(data)
    return flat


def render_environment(environment: dict[str, object], job_id: str) -> str:
    """The ``environment`` file: one ``export K='V'`` line a variable, LAVA_JOB_ID included."""
    flat = flatten_environment(environment)
    flat.setdefault("LAVA_JOB_ID", str(job_id))
    lines = ["# The test environment of this job, generated by Pumice: sourced by each run.sh.\n"]
    for name, value in flat.items():
        if not re.fullmatch(_VARIABLE, name):
            raise JobError(
                f"environment: {name!r} is not a valid shell variable name "
                "(letters, digits and _, not starting with a digit)"
            )
        lines.append(f"export {name}={sh_quote(value)}\n")
    return "".join(lines)


def _parameter_block(title: str, owner: str, params: object) -> list[str]:
    """Shell assignments for one set of parameters, between LAVA's comment markers."""
    if not params:
        return []
    if not isinstance(params, dict):
        raise JobError(f"{owner}: must be a mapping of NAME: value, not {type(params).__name__}")
    lines = [f"###{title}###\n"]
    for name, value in params.items():
        if not re.fullmatch(_VARIABLE, str(name)):
            # LAVA writes the line anyway; the shell rejects it and carries on without the
            # variable. Leave it out, and say so where the user looks.
            _warning("%s: %r is not a shell variable name: left out", owner, name)
            lines.append(f"# left out: {str(name)!r} is not a shell variable name\n")
            continue
        lines.append(f"{name}={sh_quote(parameter_value(value))}\n")
    lines.append("######\n")
    return lines


def _prologue(test: TestDefinition, base: str, what: str) -> list[str]:
    """The common head of run.sh and install.sh: environment, PATH, helpers, parameters."""
    definition = test.definition
    owner = f"test definition {test.name!r}"
    lines = [
        "#!/bin/sh\n",
        f"# {what} of test definition {test.name} ({test.uuid}), generated by Pumice: do not edit.\n",
        f". {sh_quote(base + '/environment')}\n",
        f'export PATH={sh_quote(base + "/bin")}:"$PATH"\n',
        # lava_bin set: the common functions make the most used helpers run in this shell (they
        # are loaded already when the runner sources run.sh)
        f"lava_bin={sh_quote(base + '/bin')}\n",
        '[ -n "${lava_common:-}" ] || . "$lava_bin/lava-common-functions"\n',
    ]
    for key in ("params", "parameters"):
        if definition.get(key) and not isinstance(definition[key], dict):
            raise JobError(f"{owner}: {key}: must be a mapping of NAME: value")
    # Definition defaults first, the job's values after them so that they win (LAVA's order).
    default = {**(definition.get("params") or {}), **(definition.get("parameters") or {})}
    lines += _parameter_block("default parameters from test definition", f"{owner}: params", default)
    lines += _parameter_block("test parameters from job submission", f"{owner}: parameters", test.parameters)
    return lines


def _steps(test: TestDefinition, section: str) -> list[str]:
    """The commands of ``section`` (run or install) of the definition, checked to be strings."""
    block = test.definition.get(section) or {}
    if not isinstance(block, dict):
        raise JobError(f"test definition {test.name!r}: {section}: must be a mapping with steps:")
    steps = block.get("steps") or []
    if not isinstance(steps, list):
        raise JobError(f"test definition {test.name!r}: {section}.steps: must be a list of commands")
    commands = []
    for index, step in enumerate(steps):
        if step is None:
            continue
        if not isinstance(step, str):
            hint = (
                " (an unquoted ': ' in a YAML step makes a mapping: quote the step)" if isinstance(step, dict) else ""
            )
            raise JobError(
                f"test definition {test.name!r}: {section}.steps[{index}]: must be a shell command "
                f"(a string), not {type(step).__name__}{hint}"
            )
        # A YAML block step ends with a newline already; the script adds its own.
        commands.append(step.rstrip("\n"))
    return commands


def literal_case_ids(test: TestDefinition) -> set[str]:
    """The TEST_CASE_IDs that the run steps of ``test`` pass to lava-test-case as they are (not
    made by an expansion), whose result directories (``results/<ID>/``) the overlay holds already:
    on an emulated board each directory lava-test-case has to make costs a fork, milliseconds. A
    step that never runs leaves its directory empty."""
    ids = set()
    for step in _steps(test, "run"):
        for case in re.findall(_LITERAL_CASE, step):
            if not case.startswith("-") and case not in (".", ".."):
                ids.add(case)
    return ids


def render_run_sh(test: TestDefinition, testrun_id: str, base: str, test_dir: str) -> str:
    """run.sh of one test definition: its run steps between STARTRUN and ENDRUN.

    As in LAVA, the steps run under ``set -e`` (a failing step ends the test run, and ENDRUN is
    then missing) and ``set -x`` (each step is traced on the console). The signals themselves are
    printed with tracing off, so each appears once.
    """
    lines = _prologue(test, base, "run.sh")
    if test.lava_signal == "kmsg":
        lines.append("export KMSG=true\n")  # read by lava_signal, in run.sh and the helpers
    lines += [
        "set -e\n",
        f"export TESTRUN_ID={sh_quote(testrun_id)}\n",
        f"cd {sh_quote(test_dir)}\n",
        f"UUID={sh_quote(test.uuid)}\n",
        'lava_signal "<LAVA_SIGNAL_STARTRUN $TESTRUN_ID $UUID>"\n',
        "set -x\n",
    ]
    for step in _steps(test, "run"):
        if "--cmd" in step or "--shell" in step:
            # LAVA's rule: $1... in a command handed to lava-test-case reaches it unexpanded, so
            # "awk '{print $1}'" inside double quotes still sees its $1.
            step = re.sub(_POSITIONAL, r"\\$\1", step)
        if re.search(_SIGNAL_TEXT, step):
            # The trace of a step that prints a signal itself would show the signal twice.
            lines += ["{ set +x; } 2>/dev/null\n", f"{step}\n", "set -x\n"]
        else:
            lines.append(f"{step}\n")
    lines += [
        "{ set +x; } 2>/dev/null\n",
        'lava_signal_after_output "<LAVA_SIGNAL_ENDRUN $TESTRUN_ID $UUID>"\n',
    ]
    return "".join(lines)


def render_install_sh(test: TestDefinition, base: str, test_dir: str) -> str | None:
    """install.sh of one test definition (its ``install: steps:``), or None if it has none.

    Package dependencies, keys, sources and git-repos are not installed: a board may have no
    package manager and no network, so the image must carry them. install.sh says so on the
    console and the agent logs it.
    """
    install = test.definition.get("install") or {}
    if not isinstance(install, dict):
        raise JobError(f"test definition {test.name!r}: install: must be a mapping")
    skipped = set(test.skip_install)
    ignored = []
    for key, value in install.items():
        skip = "all" in skipped or key in skipped or (key.startswith("deps-") and "deps" in skipped)
        if key == "steps" or not value or skip:
            continue
        items = value if isinstance(value, list) else [value]
        ignored.append(f"{key}: {' '.join(str(item) for item in items)}")
    for item in ignored:
        _warning(
            "test definition %r: install %s: not installed by Pumice (put it in the board's image)", test.name, item
        )
    steps = _steps(test, "install")
    if not steps or {"steps", "all"} & set(test.skip_install):
        return None
    lines = _prologue(test, base, "install.sh")
    for item in ignored:
        lines.append(f"# not installed by Pumice (the board's image must have it): {item}\n")
        lines.append(f"echo {sh_quote('pumice: install ' + item + ': not installed, the image must have it')}\n")
    lines += [f"cd {sh_quote(test_dir)}\n", "pwd\n"]
    lines += [f"{step}\n" for step in steps]
    return "".join(lines)


def _check_stages(stages: list[list[TestDefinition]]) -> None:
    """Check the definitions as LAVA does (names valid, unique, not "lava"); raise every fault at once."""
    faults = []
    seen: set[str] = set()
    for stage, tests in enumerate(stages):
        for index, test in enumerate(tests):
            where = f"test action {stage}, definition {index}"
            if not isinstance(test.name, str) or not re.fullmatch(_NAME, test.name):
                faults.append(f"{where}: name {test.name!r} may only use letters, digits, '-', '_' and '.'")
            elif test.name == "lava":
                faults.append(f"{where}: the name 'lava' is reserved (it names the job's own results)")
            elif test.name in seen:
                faults.append(
                    f"{where}: name {test.name!r} is used twice: test definition names must be unique in a job"
                )
            seen.add(test.name)
            if not isinstance(test.definition, dict):
                faults.append(f"{where}: the definition must be a mapping (metadata, run, ...)")
            if test.lava_signal not in ("stdout", "kmsg"):
                faults.append(f"{where}: lava-signal {test.lava_signal!r} is not one of: stdout, kmsg")
    if faults:
        raise JobError("; ".join(faults))


def build_overlay(
    dest: Path,
    job_id: str,
    stages: list[list[TestDefinition]],
    environment: dict[str, object] | None = None,
    results_dir: str = DEFAULT_RESULTS_DIR,
) -> Path:
    """Lay out the test overlay of job ``job_id`` under ``dest`` and return its top directory.

    ``stages`` holds the test definitions of each test action, in job order. ``environment``
    values may be nested (flattened as by :func:`flatten_environment`). The returned directory is
    ``dest`` plus the board path (``dest/lava-<job id>``); pack ``dest`` to put it on the board.
    Fills in each definition's ``uuid`` if empty.
    """
    _check_stages(stages)
    base = results_path(job_id, results_dir)
    top = Path(dest) / base.lstrip("/")
    if top.exists():
        raise FileExistsError(f"{top}: the overlay of job {job_id} is already there")
    bin_dir = top / "bin"
    bin_dir.mkdir(parents=True)
    for script in sorted(TESTSHELL_DIR.iterdir()):
        if script.name.startswith("lava-") and script.is_file():
            shutil.copyfile(script, bin_dir / script.name)
            (bin_dir / script.name).chmod(0o755)
    (top / "environment").write_text(render_environment(environment or {}, job_id), encoding="utf-8")

    count = 0  # across test actions, as LAVA numbers test runs
    for stage, tests in enumerate(stages):
        stage_dir = top / str(stage)
        (stage_dir / "tests").mkdir(parents=True)
        runner_conf = []
        for test in tests:
            testrun_id = test.testrun_id = f"{count}_{test.name}"
            test.uuid = test.uuid or f"{job_id}_{stage}.{count}"
            count += 1
            test_dir = stage_dir / "tests" / testrun_id
            board_dir = f"{base}/{stage}/tests/{testrun_id}"
            if test.source is not None:
                shutil.copytree(test.source, test_dir, symlinks=True)
            else:
                test_dir.mkdir()
                if test.path:
                    # An inline definition is written where LAVA writes it, for tests reading it.
                    inline = test_dir / test.path
                    if not inline.resolve().is_relative_to(test_dir.resolve()):
                        raise JobError(f"test definition {test.name!r}: path {test.path!r} leaves the test directory")
                    inline.parent.mkdir(parents=True, exist_ok=True)
                    inline.write_text(_yaml_text(test.definition), encoding="utf-8")
            # JSON is YAML too: the board's tests can read it with a YAML parser, and stdlib can
            # write it.
            (test_dir / "testdef.yaml").write_text(_yaml_text(test.definition), encoding="utf-8")
            (test_dir / "uuid").write_text(test.uuid, encoding="utf-8")
            install_sh = render_install_sh(test, base, board_dir)
            if install_sh is not None:
                _write_script(test_dir / "install.sh", install_sh)
            _write_script(test_dir / "run.sh", render_run_sh(test, testrun_id, base, board_dir))
            # its LAVA_RESULT_DIR, made here: the runner need not fork a mkdir on the board; nor
            # need lava-test-case for the result directory of a case named in a step as it is
            result_dir = stage_dir / "results" / testrun_id
            result_dir.mkdir(parents=True)
            for case in literal_case_ids(test):
                (result_dir / "results" / case).mkdir(parents=True, exist_ok=True)
            runner_conf.append(f"{board_dir}\n")
        (stage_dir / "lava-test-runner.conf").write_text("".join(runner_conf), encoding="utf-8")
    return top


def _yaml_text(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"


def _write_script(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(0o755)


def pack_cpio(root: Path) -> bytes:
    """``root``'s contents as a gzip-compressed cpio "newc" archive, the same bytes for the same tree.

    Paths are relative to ``root`` (which itself is not in the archive), directories come first
    (so each exists before its contents), permissions are kept, owners are root, mtimes are
    :data:`CPIO_MTIME`. Regular files, directories and symlinks; hard links are stored as copies.
    """
    import gzip  # here, not at the top: a job that is only validated packs nothing

    root = Path(root)
    directories: list[str] = []
    others: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            path = name if rel == "." else f"{rel}/{name}"
            # os.walk lists a symlink to a directory among dirnames: it is a link here.
            is_dir = stat.S_ISDIR(os.lstat(os.path.join(root, path)).st_mode)
            (directories if is_dir else others).append(path)
    chunks = []
    for inode, path in enumerate(sorted(directories) + sorted(others), start=1):
        full = os.path.join(root, path)
        info = os.lstat(full)
        mode = info.st_mode
        if stat.S_ISREG(mode):
            data = Path(full).read_bytes()
        elif stat.S_ISLNK(mode):
            data = os.fsencode(os.readlink(full))
        elif stat.S_ISDIR(mode):
            data = b""
        else:
            raise ValueError(f"{full}: only files, directories and symlinks can go into the overlay")
        nlink = 2 if stat.S_ISDIR(mode) else 1
        chunks.append(
            _cpio_entry(os.fsencode(path), stat.S_IFMT(mode) | stat.S_IMODE(mode), data, inode=inode, nlink=nlink)
        )
    chunks.append(_cpio_entry(b"TRAILER!!!", 0, b"", inode=0, nlink=1))
    return gzip.compress(b"".join(chunks), compresslevel=9, mtime=0)


def _cpio_entry(name: bytes, mode: int, data: bytes, inode: int, nlink: int) -> bytes:
    """One newc entry: the 110-byte header, the name, the data, each padded to 4 bytes."""
    fields = (inode, mode, 0, 0, nlink, CPIO_MTIME, len(data), 0, 0, 0, 0, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    entry = header + name + b"\0"
    entry += b"\0" * (-len(entry) % 4)
    return entry + data + b"\0" * (-len(data) % 4)


def append_to_ramdisk(ramdisk: Path, overlay_root: Path) -> None:
    """Append ``overlay_root``'s contents, as a cpio archive, to the initramfs file ``ramdisk``.

    The kernel unpacks an initramfs made of several cpio archives one after the other, each
    compressed or not, with zero padding between them: so the overlay goes on the end as it is,
    with no need to decompress, edit and recompress the board's ramdisk (in whatever format it
    comes). The ramdisk is first padded with zeros to a 4-byte boundary, where the kernel looks for
    the next archive. The kernel needs gzip support (CONFIG_RD_GZIP, on in practice everywhere).
    """
    ramdisk = Path(ramdisk)
    with ramdisk.open("rb") as handle:
        magic = handle.read(4)
    if magic == _UIMAGE_MAGIC:
        raise ValueError(
            f"{ramdisk}: has a U-Boot image header (mkimage): append the overlay to the bare "
            "ramdisk, then add the header (its size and checksum cover the whole ramdisk)"
        )
    archive = pack_cpio(overlay_root)
    size = ramdisk.stat().st_size
    with ramdisk.open("ab") as handle:
        handle.write(b"\0" * (-size % 4))
        handle.write(archive)
