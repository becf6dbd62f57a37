"""docs/configuration.md lists every variable: its generated table is the code's, and every
variable /info may show or a script reads has a row."""
import re

from preprocess.settings import PUBLIC_VARIABLES
from tests import config_doc

PAGE = config_doc.PAGE.read_text()


def test_the_table_is_the_codes():
    start, end = PAGE.index(config_doc.BEGIN), PAGE.index(config_doc.END) + len(config_doc.END)
    assert PAGE[start:end] == config_doc.table(), "run: python -m tests.config_doc --write"


def test_every_variable_has_a_row():
    rows = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", PAGE, flags=re.MULTILINE))
    rows |= {name for line in PAGE.splitlines() if line.startswith("| `")
             for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])}
    assert set(PUBLIC_VARIABLES) <= rows, sorted(set(PUBLIC_VARIABLES) - rows)
    assert {r.name for r in config_doc.all_rows()} <= rows
    for script in ("LLM_PREINSTALLED", "PYTHON", "LLM_PRESET", "MODEL_ID"):
        assert script in rows


def test_a_new_variable_without_a_row_fails(monkeypatch):
    rows = config_doc.all_rows()
    extra = config_doc.Row("NEW_KNOB", "int", "`1`", "", "`preprocess.settings.load_x`")
    monkeypatch.setattr(config_doc, "all_rows", lambda: [*rows, extra])
    start, end = PAGE.index(config_doc.BEGIN), PAGE.index(config_doc.END) + len(config_doc.END)
    assert PAGE[start:end] != config_doc.table()
