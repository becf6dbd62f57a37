"""The shape docs/architecture.md describes, checked on the source itself."""
from __future__ import annotations

import ast
import re

import pytest

from preprocess import settings as cfg
from preprocess.errors import ErrorKind
from tests.conftest import REPO

PACKAGES = ("preprocess", "shim")
# Where the process environment may be read: the settings module and the entry points
# that hand os.environ to it (process set-up), nowhere else.
ENVIRONMENT_READERS = {
    "preprocess/settings.py", "preprocess/envparse.py", "preprocess/engine/config.py", "preprocess/__main__.py",
    "shim/serve.py", "shim/app.py",
    "model_repository/generator/1/model.py", "model_repository/preprocess/1/model.py",
    "model_repository/postprocess/1/model.py", "model_repository/generator_stream/1/model.py",
}
# reasoning.py is not among them: it runs vLLM's own reasoning parsers (imported on first use).
TEXT_STAGES = ("chat", "cleanup", "routing", "sampling", "preprocess_stage", "postprocess_stage", "tokenizer")


def sources():
    for folder in (*PACKAGES, "model_repository"):
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path.read_text()


def imported_modules(text: str, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[:-node.level]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


def test_only_the_settings_and_process_set_up_read_the_environment():
    readers = {path for path, text in sources() if re.search(r"os\.environ|os\.getenv|getenv\(", text)}
    assert readers <= ENVIRONMENT_READERS, readers - ENVIRONMENT_READERS


@pytest.mark.parametrize("stage", TEXT_STAGES)
def test_text_stages_know_nothing_of_the_engine_or_triton(stage):
    text = (REPO / "preprocess" / f"{stage}.py").read_text()
    modules = imported_modules(text, f"preprocess.{stage}")
    assert not {m for m in modules if m.startswith(("preprocess.engine", "vllm", "triton", "shim"))}


def test_the_package_never_imports_triton():
    """Triton's pb_utils exists only inside a stub: the package is tested without a server."""
    for path, text in sources():
        if path.startswith(PACKAGES):
            modules = imported_modules(text, path[:-3].replace("/", "."))
            assert "triton_python_backend_utils" not in modules, path


def test_build_sh_embeds_the_model_the_settings_name():
    assert f"MODEL_ID_DEFAULT={cfg.EMBEDDED_MODEL_ID} " in (REPO / "build.sh").read_text()


def test_settings_are_built_once_into_one_frozen_object():
    environ = {"MAX_NEW_TOKENS": "40", "MAX_NEW_TOKENS_CODE": "300", "OUTPUT_MAX_SENTENCES": "3",
               "HF_TOKEN": "hf_x", "PORT": "9000"}
    settings = cfg.load(environ, metax=False)
    assert settings.routing == cfg.load_routing(environ) and settings.cleanup == cfg.load_cleanup(environ)
    assert settings.shim.port == 9000 and settings.largest_token_limit == 300
    assert dict(settings.public_environment) == {"MAX_NEW_TOKENS": "40", "MAX_NEW_TOKENS_CODE": "300",
                                                 "OUTPUT_MAX_SENTENCES": "3", "PORT": "9000"}
    environ["MAX_NEW_TOKENS"] = "50"  # a later change of the mapping is not seen: parsed once
    assert settings.routing.max_new_tokens == 40
    with pytest.raises(Exception):
        settings.routing = cfg.load_routing({})  # frozen
    with pytest.raises(TypeError):
        settings.public_environment["X"] = "y"  # read-only


def test_a_malformed_engine_variable_stops_load_with_one_line():
    with pytest.raises(cfg.SettingsError, match=r"^GPU_MEMORY_UTILIZATION='lots' is not a number$"):
        cfg.load({"GPU_MEMORY_UTILIZATION": "lots"}, metax=False)


@pytest.mark.parametrize("module", ["settings", "engine_settings", "envparse", "contract", "errors"])
def test_the_settings_import_nothing_of_the_engine(module):
    """The engine imports the settings, never the other way: no import circle."""
    text = (REPO / "preprocess" / f"{module}.py").read_text()
    assert not {m for m in imported_modules(text, f"preprocess.{module}") if m.startswith("preprocess.engine.")
                or m == "preprocess.engine"}


def modules_and_names(text: str, module: str) -> set[str]:
    """imported_modules, plus `package.name` for each `from package import name`."""
    found = imported_modules(text, module)
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            base = (module.split(".")[:-node.level] if node.level else [])
            package = ".".join(base + ([node.module] if node.module else []))
            found.update(f"{package}.{alias.name}" for alias in node.names)
    return found


def test_each_stage_has_its_own_module_and_shim_only_modules_live_in_the_shim():
    """The postprocess model never loads the preprocess stage, and every module of the package
    is used by the package or a Triton model, not by the shim alone."""
    post = modules_and_names((REPO / "model_repository/postprocess/1/model.py").read_text(), "model")
    assert "preprocess.preprocess_stage" not in post and "preprocess.postprocess_stage" in post
    used_inside, used_by_shim = set(), set()
    for path, text in sources():
        found = modules_and_names(text, path[:-3].replace("/", "."))
        (used_by_shim if path.startswith("shim/") else used_inside).update(found)
    for path in sorted((REPO / "preprocess").glob("*.py")):
        module = f"preprocess.{path.stem}"
        if path.stem not in ("__init__", "__main__") and module in used_by_shim:
            assert module in used_inside, f"{module} serves only the shim: it belongs in shim/"


ERROR_KIND_NAMES = "|".join(kind.value for kind in ErrorKind)
# A kind compared as a bare string ('== "invalid"', 'in ("unavailable", ...)'), not as ErrorKind.
KIND_AS_STRING = re.compile(rf"""(==|!=|\bin\s*[(\[{{])\s*["']({ERROR_KIND_NAMES})["']|["']({ERROR_KIND_NAMES})["']\s*(==|!=)""")
# A status read out of a message's text: a "[400] " tag, or words searched for in an error's message.
STATUS_FROM_TEXT = re.compile(r"""\[(400|500|503)\]|["'][\w ;]+["']\s+in\s+(message|exc\.message\(\)|str\(exc\))""")
ADAPTER_LINES = 110  # a Triton model.py reads tensors, calls the package, writes tensors


def test_no_error_kind_is_compared_as_a_string():
    found = [f"{path}:{n}" for path, text in sources() for n, line in enumerate(text.splitlines(), 1)
             if KIND_AS_STRING.search(line)]
    assert found == []


def test_no_status_is_read_from_a_message():
    found = [f"{path}:{n}" for path, text in sources() for n, line in enumerate(text.splitlines(), 1)
             if STATUS_FROM_TEXT.search(line)]
    assert found == []


def test_the_guards_see_what_they_are_for():
    """Positive controls: the two patterns above catch the forms they forbid."""
    assert KIND_AS_STRING.search('if kind == "invalid":') and KIND_AS_STRING.search("'unavailable' != kind")
    assert KIND_AS_STRING.search('kind in ("internal", "x")') and not KIND_AS_STRING.search("kind is ErrorKind.INVALID")
    assert STATUS_FROM_TEXT.search('return f"[400] {message}"')
    assert STATUS_FROM_TEXT.search('if "restarting" in message:') and not STATUS_FROM_TEXT.search("if kind := error:")


@pytest.mark.parametrize("model", sorted(p.parent.parent.name for p in (REPO / "model_repository").glob("*/1/model.py")))
def test_every_triton_adapter_stays_thin(model):
    lines = len((REPO / "model_repository" / model / "1" / "model.py").read_text().splitlines())
    assert lines <= ADAPTER_LINES, f"{model}/1/model.py has {lines} lines (budget {ADAPTER_LINES})"
