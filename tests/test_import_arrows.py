"""The packages import one way (README "Architecture"): read from the source, nothing is imported."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# package -> the packages of this project it may import
ALLOWED = {
    "utils.common": set(),
    "dataset": {"utils.common"},
    "utils.method": {"utils.common"},
    "utils.models": {"utils.common", "utils.method"},
    "utils.stages": {"utils.common", "utils.method", "utils.models", "dataset"},
    "evaluation": {"utils.common", "utils.method", "utils.models", "dataset"},
}
SCRIPTS = ("edge_diffusion_train", "edge_diffusion_sampling", "caption_synthesis_", "demo", "benchmarks", "tests")


def _package(module: str):
    return next((p for p in sorted(ALLOWED, key=len, reverse=True) if module == p or module.startswith(p + ".")),
                None)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_packages_import_only_downwards_and_never_a_script():
    wrong = []
    for path in sorted([*ROOT.glob("utils/**/*.py"), *ROOT.glob("dataset/*.py"), *ROOT.glob("evaluation/*.py")]):
        me = _package(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in _imports(path):
            target = _package(module)
            if module.startswith(SCRIPTS) or (target and target != me and target not in ALLOWED[me]):
                wrong.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not wrong, wrong
