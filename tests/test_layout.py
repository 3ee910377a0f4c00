"""The layout tells the architecture: the packages, and pretrain's rooms, stand on floors, and imports only go down
(every import read from the source, those inside functions included).

Packages: launch -> pretrain -> data_pipeline -> durable. Within pretrain: its top-level modules are the base every
room stands on (config, parallel, dtypes, hardware, plan, launch_contract); then model; then checkpoint; then
training, release and inference side by side, none of which imports another."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from tests.runs import ROOT

PACKAGE_FLOORS = {"durable": 0, "data_pipeline": 1, "pretrain": 2, "launch": 3}
ROOM_FLOORS = {"base": 0, "model": 1, "checkpoint": 2, "training": 3, "release": 3, "inference": 3}


def imported_modules(source: str) -> list[str]:
    """Every name an import in `source` takes, in full: `from pretrain import parallel` takes pretrain.parallel."""
    modules = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, "a relative import: the floors are read from absolute ones"
            modules += [f"{node.module}.{alias.name}" for alias in node.names]
    return modules


def room(parts: tuple[str, ...]) -> str:
    """The room of a module of pretrain, by its path below pretrain: ('model', 'mistral') -> model, ('config',) ->
    base."""
    return parts[0] if len(parts) > 1 and parts[0] in ROOM_FLOORS else "base"


def back_imports(root: Path) -> list[str]:
    """The imports below `root` that go up a floor, or sideways between two rooms of pretrain on one floor."""
    found = []
    for package, floor in PACKAGE_FLOORS.items():
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            for module in imported_modules(path.read_text()):
                top, *below = module.split(".")
                if PACKAGE_FLOORS.get(top, -1) > floor:
                    found.append(f"{relative} imports {module}: up from {package} to {top}")
                elif package == top == "pretrain":
                    here, there = room(relative.with_suffix("").parts[1:]), room(tuple(below))
                    if there != here and ROOM_FLOORS[there] >= ROOM_FLOORS[here]:
                        way = "up" if ROOM_FLOORS[there] > ROOM_FLOORS[here] else "sideways"
                        found.append(f"{relative} imports {module}: {way} from pretrain's {here} to its {there}")
    return found


def test_every_room_of_pretrain_stands_on_a_floor():
    rooms = {path.parent.name for path in (ROOT / "pretrain").glob("*/*.py")}
    assert rooms == set(ROOM_FLOORS) - {"base"}, "a folder of pretrain without a floor in ROOM_FLOORS, or one gone"


def test_imports_only_go_down_the_floors():
    assert back_imports(ROOT) == []


def test_a_back_import_is_found(tmp_path):
    for path, source in {
        "durable/output.py": "import os",
        "data_pipeline/loader.py": "from durable import atomic_directory\nimport pretrain.config",
        "pretrain/config.py": "import yaml",
        "pretrain/model/mistral.py": """
            from pretrain import parallel

            def fit():
                from pretrain.training.trainer import Trainer
        """,
        "pretrain/checkpoint/weights.py": "from pretrain.model.sharding import shard_parameter",
        "pretrain/release/export.py": """
            from pretrain.checkpoint.weights import Weights
            from pretrain.inference import chat
        """,
        "launch/cli.py": "from pretrain.training.trainer import main",
    }.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(source))
    assert back_imports(tmp_path) == [
        "data_pipeline/loader.py imports pretrain.config: up from data_pipeline to pretrain",
        "pretrain/model/mistral.py imports pretrain.training.trainer.Trainer: up from pretrain's model to its training",
        "pretrain/release/export.py imports pretrain.inference.chat: sideways from pretrain's release to its inference",
    ]
