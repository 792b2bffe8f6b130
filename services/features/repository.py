"""The feature repository's definition files: validated, staged on disk, and loaded.

A client sends the repository's Python files as ``{relative path: bytes}``. Nothing it sends may
make the service write outside its definitions folder: paths are checked component by component
(relative, no ``..``, no hidden names, ``.py`` only), sizes are bounded, files are created with
``O_EXCL | O_NOFOLLOW`` inside a folder this module has just made, and every target is checked to
resolve inside it. A new set of files replaces the old one only after Feast accepted it.

Loading executes the files, as ``feast apply`` does: the caller of ``ApplyRepository`` must be
trusted with code execution on the features service.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shutil
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from plinth_common.errors import InvalidArgument

if TYPE_CHECKING:
    from feast.repo_contents import RepoContents

__all__ = ["DefinitionFiles", "Limits", "load_repo_contents", "validate_files"]

DEFINITIONS_DIR = "definitions"
INCOMING_DIR = ".incoming"
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# sys.path and sys.modules are process-wide: one load at a time.
_IMPORT_LOCK = threading.Lock()


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Bounds on what one ``ApplyRepository`` may send."""

    max_files: int = 200
    max_file_bytes: int = 1 << 20
    max_total_bytes: int = 8 << 20
    max_depth: int = 8
    max_path_chars: int = 255


@dataclass(frozen=True)
class DefinitionFiles:
    """Validated definition files: normalized relative paths and their contents."""

    files: Mapping[PurePosixPath, bytes]

    @property
    def top_level_modules(self) -> set[str]:
        """Names the files add to the import namespace (modules and packages)."""
        return {p.parts[0].removesuffix(".py") for p in self.files}


def _field(path: str) -> str:
    return f"files[{path!r}]"


def validate_files(files: Mapping[str, bytes], limits: Limits = Limits()) -> DefinitionFiles:
    """Checks paths, names and sizes of the files a client sent.

    Args:
        files: relative path -> content.
        limits: the bounds to enforce.

    Returns:
        The files with normalized paths.

    Raises:
        InvalidArgument: naming the offending file (``files['../x.py']``) or ``files``.
    """
    if not files:
        raise InvalidArgument("files", "no files: send the repository's Python definition files")
    if len(files) > limits.max_files:
        raise InvalidArgument("files", f"{len(files)} files, at most {limits.max_files} allowed")
    total = 0
    clean: dict[PurePosixPath, bytes] = {}
    for raw, content in files.items():
        path = _checked_path(raw, limits)
        if len(content) > limits.max_file_bytes:
            raise InvalidArgument(
                _field(raw), f"{len(content)} bytes, at most {limits.max_file_bytes} allowed"
            )
        total += len(content)
        if total > limits.max_total_bytes:
            raise InvalidArgument("files", f"more than {limits.max_total_bytes} bytes in total")
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidArgument(_field(raw), "not UTF-8 text") from None
        if path in clean:
            raise InvalidArgument(_field(raw), "sent twice")
        clean[path] = content
    definitions = DefinitionFiles(clean)
    _check_module_names(definitions)
    return definitions


def _checked_path(raw: str, limits: Limits) -> PurePosixPath:
    if not raw or len(raw) > limits.max_path_chars:
        raise InvalidArgument(
            _field(raw), f"path must have 1 to {limits.max_path_chars} characters"
        )
    if "\\" in raw or "\x00" in raw or ":" in raw:
        raise InvalidArgument(_field(raw), "path must use '/' and no ':', '\\' or NUL")
    if raw.startswith("/"):
        raise InvalidArgument(_field(raw), "path must be relative")
    parts = raw.split("/")
    if len(parts) > limits.max_depth:
        raise InvalidArgument(_field(raw), f"at most {limits.max_depth} levels deep")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidArgument(_field(raw), "path must not contain empty, '.' or '..' parts")
        if not _COMPONENT.fullmatch(part):
            raise InvalidArgument(
                _field(raw),
                f"{part!r}: names use letters, digits, '_', '-', '.' and do not start with '.' or '-'",
            )
    if not parts[-1].endswith(".py"):
        raise InvalidArgument(_field(raw), "only Python (.py) files are accepted")
    return PurePosixPath(*parts)


def _check_module_names(definitions: DefinitionFiles) -> None:
    """Refuses files that would shadow an installed module while the repository loads."""
    for name in sorted(definitions.top_level_modules):
        if name == "__init__":
            continue
        if not name.isidentifier():
            continue  # not importable by name: loaded from its path only
        if (
            name in sys.modules
            or name in sys.stdlib_module_names
            or importlib.util.find_spec(name) is not None
        ):
            raise InvalidArgument(
                _field(name), f"module name {name!r} shadows an installed module; rename the file"
            )


class RepositoryFolder:
    """The definitions folder inside the Feast repository, replaced as a whole.

    Args:
        repo_path: the Feast repository (holds ``feature_store.yaml``).
    """

    def __init__(self, repo_path: Path) -> None:
        self._root = repo_path.resolve()

    @property
    def definitions(self) -> Path:
        """Where the applied definition files live."""
        return self._root / DEFINITIONS_DIR

    def stage(self, definitions: DefinitionFiles) -> Path:
        """Writes the files into a fresh folder of their own and returns it.

        The caller serializes stage/promote/discard (one apply at a time).
        """
        incoming = self._root / INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True)
        # Applies run one at a time: anything left here is from one that died mid-way.
        for leftover in incoming.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        staging = incoming / uuid.uuid4().hex
        staging.mkdir(mode=0o700)
        root = staging.resolve()
        try:
            for path, content in definitions.files.items():
                target = root.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                # Defence in depth: the validated parts cannot escape, and nothing else writes here.
                if not target.parent.resolve().is_relative_to(root):
                    raise InvalidArgument(_field(str(path)), "path leaves the repository")
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(content)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def promote(self, staging: Path) -> None:
        """Makes ``staging`` the definitions folder (the previous one is removed)."""
        current = self.definitions
        retired = staging.parent / f"retired-{uuid.uuid4().hex}"
        if current.exists():
            os.replace(current, retired)
        os.replace(staging, current)
        shutil.rmtree(retired, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        """Removes a staged folder that was not applied."""
        shutil.rmtree(staging, ignore_errors=True)


def load_repo_contents(folder: Path, *, project: str) -> RepoContents:
    """Executes the definition files in ``folder`` and collects their Feast objects.

    Mirrors ``feast.repo_operations.parse_repo`` without its process-wide side effects: no change
    of working directory, and the modules the files define are removed again afterwards.

    Raises:
        InvalidArgument: a file fails to load (naming it), or it declares another project.
    """
    from feast.feature_view import DUMMY_ENTITY
    from feast.project import Project
    from feast.repo_contents import RepoContents

    contents = RepoContents(
        projects=[],
        data_sources=[],
        feature_views=[],
        on_demand_feature_views=[],
        stream_feature_views=[],
        label_views=[],
        entities=[],
        feature_services=[],
        permissions=[],
    )
    # One import scope for all files: a file importing another gets the very objects that file
    # defined, so nothing is collected twice.
    with _IMPORT_LOCK, _importable_from(folder):
        for path in sorted(p for p in folder.rglob("*.py") if p.name != "__init__.py"):
            module = _load(folder, path)
            for name in dir(module):
                _collect(contents, getattr(module, name))
    if len(contents.projects) > 1:
        raise InvalidArgument("files", "more than one feast.Project declared")
    if contents.projects and contents.projects[0].name != project:
        raise InvalidArgument(
            "files",
            f"declares project {contents.projects[0].name!r}, this service serves {project!r}",
        )
    if not contents.projects:
        contents.projects.append(Project(name=project, description=""))
    contents.entities.append(DUMMY_ENTITY)
    return contents


def _load(folder: Path, path: Path) -> Any:
    relative = path.relative_to(folder)
    parts = relative.with_suffix("").parts
    try:
        if all(p.isidentifier() for p in parts):
            return importlib.import_module(".".join(parts))
        spec = importlib.util.spec_from_file_location(f"_plinth_repo_{uuid.uuid4().hex}", path)
        if spec is None or spec.loader is None:
            raise InvalidArgument(_field(str(relative)), "cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except SyntaxError as exc:
        raise InvalidArgument(
            _field(str(relative)), f"syntax error at line {exc.lineno}: {exc.msg}"
        ) from None
    except InvalidArgument:
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code may raise anything, exit included
        raise InvalidArgument(
            _field(str(relative)), f"failed to load: {type(exc).__name__}: {exc}"
        ) from None


@contextmanager
def _importable_from(folder: Path) -> Iterator[None]:
    """Puts ``folder`` first on sys.path for the files' own imports, then undoes it all.

    Afterwards the modules and packages the files define are dropped from ``sys.modules``
    (validation made sure none of their names belongs to an installed module), so the next
    apply imports its own files afresh.
    """
    own = {
        p.stem if p.is_file() else p.name
        for p in folder.iterdir()
        if p.suffix == ".py" or p.is_dir()
    }
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in list(sys.modules):
            if name.split(".")[0] in own or name.startswith("_plinth_repo_"):
                del sys.modules[name]


def _collect(contents: RepoContents, obj: Any) -> None:
    """Adds ``obj`` when it is a Feast object not seen yet (the rules of ``parse_repo``)."""
    from feast import (
        BatchFeatureView,
        Entity,
        FeatureService,
        FeatureView,
        OnDemandFeatureView,
        StreamFeatureView,
    )
    from feast.data_source import DataSource, KafkaSource, KinesisSource, PushSource
    from feast.project import Project

    def add(items: list[Any], item: Any) -> None:
        if item is not None and not any(item is seen for seen in items):
            items.append(item)

    if isinstance(obj, DataSource):
        add(contents.data_sources, obj)
        if isinstance(obj, (PushSource, KafkaSource, KinesisSource)):
            add(contents.data_sources, obj.batch_source)
    if isinstance(obj, StreamFeatureView):
        add(contents.stream_feature_views, obj)
        add(contents.data_sources, obj.batch_source)
        add(contents.data_sources, obj.stream_source)
    elif isinstance(obj, (FeatureView, BatchFeatureView)):
        add(contents.feature_views, obj)
        add(contents.data_sources, obj.batch_source)
        add(contents.data_sources, getattr(obj, "stream_source", None))
    elif isinstance(obj, Entity):
        add(contents.entities, obj)
    elif isinstance(obj, FeatureService):
        add(contents.feature_services, obj)
    elif isinstance(obj, OnDemandFeatureView):
        add(contents.on_demand_feature_views, obj)
    elif isinstance(obj, Project):
        add(contents.projects, obj)
