"""ChampSource on the real CHAMP data, HFDatasetSource on local files, and the conf/data YAMLs that use them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from capo_lightning.commands.cli import main
from capo_lightning.data.champ import ChampSource, champ_answer, champ_gradeable
from capo_lightning.data.library_sources import HFDatasetSource
from capo_lightning.data.prompts import DEFAULT_INSTRUCTION, PromptItem
from capo_lightning.rewards.grading import is_equivalent
from tests.conftest import ROOT

HAS_DATASETS = importlib.util.find_spec("datasets") is not None
HAS_CHAMP = importlib.util.find_spec("champ_dataset") is not None
needs_datasets = pytest.mark.skipif(not HAS_DATASETS, reason="needs the datasets package (hub extra)")
needs_champ = pytest.mark.skipif(not HAS_CHAMP, reason="needs champ-dataset (offline extra)")
CATEGORIES = ["Combinatorics", "Inequality", "Number-Theory", "Polynomial", "Sequence"]


def _ids(source: ChampSource) -> list[str]:
    return [source.item(i).columns["problem_id"] for i in range(source.size)]


# ---------------------------------------------------------------- ChampSource


@needs_champ
def test_champ_has_all_270_problems_in_natural_id_order() -> None:
    source = ChampSource(gradeable_only=False)
    ids = _ids(source)
    assert source.size == 270 and len(set(ids)) == 270 and source.name() == "champ"
    assert ids[:3] == ["P_Combinatorics_1", "P_Combinatorics_2", "P_Combinatorics_3"]
    assert ids[9] == "P_Combinatorics_10" and ids[-1] == "P_Sequence_50"  # natural, not lexicographic
    categories = [source.item(i).columns["category"] for i in range(source.size)]
    assert sorted(set(categories)) == CATEGORIES and categories == sorted(categories)  # grouped by category
    again = ChampSource(gradeable_only=False)
    assert [again.item(i) for i in range(270)] == [source.item(i) for i in range(270)]
    with pytest.raises(IndexError, match="champ"):
        source.item(270)


@needs_champ
def test_champ_item_prompt_answer_and_columns() -> None:
    first = ChampSource().item(0)
    question = "Let a string consist of digit 1, 2, 3. How many such strings of length 6 have adjacent digit differing"
    assert first.prompt.startswith(question) and first.prompt.endswith("? " + DEFAULT_INSTRUCTION)
    assert first.answer == "239"
    assert first.columns == {"problem_id": "P_Combinatorics_1", "category": "Combinatorics", "original_answer": "239"}
    assert ChampSource(instruction="Box it.").item(0).prompt.endswith("to 1? Box it.")
    assert ChampSource(instruction="").item(0).prompt.endswith("less than or equal to 1?")


@needs_champ
def test_champ_gradeable_only_drops_sentence_answers_and_cleans_glosses() -> None:
    everything, gradeable = ChampSource(gradeable_only=False), ChampSource()
    assert gradeable.size == 228
    kept = set(_ids(gradeable))
    assert kept < set(_ids(everything))
    assert _ids(gradeable) == [pid for pid in _ids(everything) if pid in kept]  # same order, filtered
    dropped = {everything.item(i).columns["original_answer"] for i in range(270) if _ids(everything)[i] not in kept}
    assert {"No integer solutions", "The limit does not exist", "C(n+1, 2m+1)"} <= dropped
    answers = {item.columns["problem_id"]: item for item in (gradeable.item(i) for i in range(gradeable.size))}
    assert all(champ_gradeable(item.answer) for item in answers.values())
    assert answers["P_Sequence_50"].answer == "100"
    assert answers["P_Sequence_50"].columns["original_answer"] == "100 (i.e., all values)"
    assert answers["P_Number-Theory_3"].answer == "376, 625"


@needs_champ
@pytest.mark.parametrize(
    ("problem_id", "prediction", "correct"),
    [
        ("P_Combinatorics_6", "2^{n-1}", True),  # gold "2^(n-1)"
        ("P_Combinatorics_6", "2^{n}", False),
        ("P_Combinatorics_2", "252", True),  # gold "C(10, 5), or equivalently 252"
        ("P_Number-Theory_3", "625, 376", True),  # gold "376 and 625"
        ("P_Number-Theory_3", "376", False),
        ("P_Number-Theory_70", "(1,1),(3,2)", True),  # gold "x=1, y=1 and x=3, y=2"
        ("P_Sequence_41", "\\frac{1+\\sqrt{4a+1}}{2}", True),  # gold "The limit exists and is equal to ..."
        ("P_Number-Theory_1", "\\text{No}", True),
        ("P_Number-Theory_1", "Yes", False),
    ],
)
def test_champ_gold_answers_grade_model_style_latex(problem_id: str, prediction: str, correct: bool) -> None:
    source = ChampSource()
    gold = next(source.item(i).answer for i in range(source.size) if source.item(i).columns["problem_id"] == problem_id)
    assert is_equivalent(prediction, gold) is correct


@needs_champ
def test_champ_category_filter_keeps_order() -> None:
    everything = ChampSource(gradeable_only=False)
    subset = ChampSource(categories=["Sequence", "Inequality"], gradeable_only=False)
    assert subset.size == 100
    assert _ids(subset) == [pid for pid in _ids(everything) if pid.startswith(("P_Inequality_", "P_Sequence_"))]
    assert {subset.item(i).columns["category"] for i in range(subset.size)} == {"Inequality", "Sequence"}


@needs_champ
@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"categories": ["Geometry", "Sequence"]}, ["`categories`", "'Geometry'", "'Number-Theory'"]),
        ({"categories": []}, ["`categories`", "empty"]),
        ({"version": "v9"}, ["`version`", "'v9'", "['v0']"]),
    ],
)
def test_champ_bad_arguments_name_key_and_valid_values(kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ValueError, match="ChampSource") as error:
        ChampSource(**kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_champ_without_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "champ_dataset", None)  # makes the import fail as if absent
    with pytest.raises(ImportError, match="pip install champ-dataset"):
        ChampSource()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("100 (i.e., all values)", "100"),
        ("0 (none of the values)", "0"),
        ("C(10, 5), or equivalently 252", "252"),
        ("5/14, or approximately 35.7%", "5/14"),
        ("-3 is the only possible value", "-3"),
        ("The limit exists and is equal to (a+3b)/2", "(a+3b)/2"),
        ("The only possible value for the limit is sqrt(a)", "sqrt(a)"),
        ("0 roots", "0"),
        ("1, 4 and 9", "1, 4, 9"),
        ("x=0, y=2 and x=9, y=11", "(x=0, y=2), (x=9, y=11)"),
        ("(x=1, y=2) and (x=2, y=1)", "(x=1, y=2), (x=2, y=1)"),
        ("Yes, and the sequence is 1/2^3, 1/2^6, 1/2^9, ...", "Yes, and the sequence is 1/2^3, 1/2^6, 1/2^9, ..."),
        ("x(n)<y(n-1) for all n≥3", "x(n)<y(n-1) for all n≥3"),
    ],
)
def test_champ_answer_rewrites(raw: str, clean: str) -> None:
    assert champ_answer(raw) == clean


@pytest.mark.parametrize(
    ("answer", "gradeable"),
    [
        ("2^(n-1)", True),
        ("(2n)!/(2^n*n!)", True),
        ("x=y=0", True),
        ("a(x+y)", True),
        ("Yes", True),
        ("No", True),
        ("No integer solutions", False),
        ("n times", False),
        ("f(x)=0 or f(x)=1", False),
        ("2^floor(n/2)*floor(n/2)!", False),
        ("sum_(k=1)^n 1/k", False),
        ("C(n+1, 2m+1)", False),
        ("x=±1, ±2, ±1/2", False),
        ("x(x-1)(x-2)...(x-2022)", False),
        ("(x^2+x+1)(x^2-x+1)(x^4-x^2+1)", True),  # four exponents: within the guard's limit of eight
    ],
)
def test_champ_gradeable_rule(answer: str, gradeable: bool) -> None:
    assert champ_gradeable(answer) is gradeable


# ---------------------------------------------------------------- HFDatasetSource on local files

MATH_ROWS = [
    {"problem": "What is half of one?", "solution": "Halve it: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Q2", "solution": "First \\boxed{1}, then \\boxed{2}", "level": "Level 2"},
]
GSM8K_ROWS = [
    {"question": "How many apples?", "answer": "1000 + 234 = <<1000+234=1234>>1,234 apples.\n#### 1,234"},
    {"question": "Q2", "answer": "A step #### 3\n#### -5"},
]
RAW_ROWS = [{"problem": "P1", "answer": " \\frac{1}{2} ", "solution": "long"}, {"problem": "P2", "answer": "7"}]


def _write(tmp_path: Path, builder: str, rows: list[dict[str, Any]]) -> str:
    """Writes ``rows`` as JSONL (builder "json") or parquet; returns the path."""
    if builder == "json":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


@needs_datasets
@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_boxed_takes_last_box_with_nested_braces(tmp_path: Path, builder: str) -> None:
    source = HFDatasetSource(path=builder, data_files=_write(tmp_path, builder, MATH_ROWS))
    assert source.size == 2 and source.name() == f"hf:{builder}"
    expected = PromptItem(f"What is half of one? {DEFAULT_INSTRUCTION}", "\\frac{1}{2}", {"level": "Level 1"})
    assert source.item(0) == expected
    assert source.item(1).answer == "2"
    with pytest.raises(IndexError):
        source.item(2)


@needs_datasets
@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_gsm8k_takes_text_after_last_hashes_without_commas(tmp_path: Path, builder: str) -> None:
    files = _write(tmp_path, builder, GSM8K_ROWS)
    source = HFDatasetSource(
        path=builder, data_files=files, prompt_key="question", answer_key="answer", answer_format="gsm8k"
    )
    assert [source.item(i).answer for i in range(2)] == ["1234", "-5"]
    assert source.item(0) == PromptItem(f"How many apples? {DEFAULT_INSTRUCTION}", "1234", {})


@needs_datasets
@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_hf_raw_keeps_the_column_stripped(tmp_path: Path, builder: str) -> None:
    files = _write(tmp_path, builder, RAW_ROWS)
    source = HFDatasetSource(path=builder, data_files=files, answer_key="answer", answer_format="raw", instruction="")
    assert source.item(0) == PromptItem("P1", "\\frac{1}{2}", {"solution": "long"})
    assert source.item(1) == PromptItem("P2", "7", {"solution": None})


@needs_datasets
@pytest.mark.parametrize("builder", ["json", "parquet"])
@pytest.mark.parametrize(
    ("answer_format", "rows", "keys"),
    [
        ("boxed", [MATH_ROWS[0], {"problem": "P", "solution": "no box here", "level": "x"}], {}),
        ("boxed", [MATH_ROWS[0], {"problem": "P", "solution": "empty \\boxed{ }", "level": "x"}], {}),
        ("gsm8k", [GSM8K_ROWS[0], {"question": "Q", "answer": "The answer is 4."}], {"prompt_key": "question"}),
        ("gsm8k", [GSM8K_ROWS[0], {"question": "Q", "answer": "4\n####  "}], {"prompt_key": "question"}),
        ("raw", [RAW_ROWS[1], {"problem": "P", "answer": " "}], {}),
    ],
)
def test_hf_row_without_answer_names_format_row_and_fix(
    tmp_path: Path, builder: str, answer_format: str, rows: list[dict[str, Any]], keys: dict[str, str]
) -> None:
    answer_key = "solution" if answer_format == "boxed" else "answer"
    with pytest.raises(ValueError, match=r"`answer_format`.*1 rows \(first: row 1\).*Fix: pick the answer_format"):
        HFDatasetSource(
            path=builder,
            data_files=_write(tmp_path, builder, rows),
            answer_key=answer_key,
            answer_format=answer_format,
            **keys,
        )


@needs_datasets
@pytest.mark.parametrize("builder", ["json", "parquet"])
@pytest.mark.parametrize(
    ("kwargs", "arg"), [({"prompt_key": "question"}, "prompt_key"), ({"answer_key": "ans"}, "answer_key")]
)
def test_hf_missing_column_names_key_and_columns(
    tmp_path: Path, builder: str, kwargs: dict[str, str], arg: str
) -> None:
    with pytest.raises(ValueError, match=f"`{arg}`.*not in {builder}.*'problem', 'solution', 'level'"):
        HFDatasetSource(path=builder, data_files=_write(tmp_path, builder, MATH_ROWS), **kwargs)


@needs_datasets
def test_hf_bad_answer_format_fails_before_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def no_load(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load_dataset must not run")

    monkeypatch.setattr(datasets, "load_dataset", no_load)
    with pytest.raises(ValueError, match=r"`answer_format`.*'latex'.*\['boxed', 'gsm8k', 'raw'\]"):
        HFDatasetSource(answer_format="latex")
    with pytest.raises(TypeError, match="extract_boxed"):
        HFDatasetSource(extract_boxed=True)  # type: ignore[call-arg]  # replaced by answer_format


# ---------------------------------------------------------------- conf/data YAMLs

DATA_CONFIGS = {
    "math.yaml": {"train_source": ("DigitalLearningGmbH/MATH-lighteval", None, "train", "boxed")},
    "math500.yaml": {"val_source": ("HuggingFaceH4/MATH-500", None, "test", "raw")},
    "gsm8k.yaml": {
        "train_source": ("openai/gsm8k", "main", "train", "gsm8k"),
        "val_source": ("openai/gsm8k", "main", "test", "gsm8k"),
    },
}
SHAPED_ROWS = {"boxed": MATH_ROWS, "raw": [{"problem": "P", "answer": "1"}], "gsm8k": GSM8K_ROWS}


@needs_datasets
@pytest.mark.parametrize("name", [*DATA_CONFIGS, "champ.yaml"])
def test_data_config_parses_through_the_cli_without_loading(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("parsing must not load data"))
    monkeypatch.setitem(sys.modules, "champ_dataset", None)  # instantiating ChampSource would now fail
    base, path = ROOT / "conf/debug/tiny_cpu.yaml", ROOT / "conf/data" / name
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(base), "--config", str(path), "--print_config"])
    assert exc.value.code in (0, None)
    data = yaml.safe_load(capsys.readouterr().out)["data"]
    expected = "ChampSource" if name == "champ.yaml" else "HFDatasetSource"
    assert data["val_source" if name != "math.yaml" else "train_source"]["class_path"].endswith(expected)
    assert path.read_text().startswith("# ")  # says when it works


@needs_datasets
@pytest.mark.parametrize("name", list(DATA_CONFIGS))
def test_hub_config_init_args_build_a_source(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML's init_args are valid HFDatasetSource arguments; the Hub load is replaced by local rows."""
    import datasets

    calls: list[tuple[str, str | None, str]] = []

    def fake_load(path: str, name: str | None, split: str, data_files: Any) -> Any:
        calls.append((path, name, split))
        return datasets.Dataset.from_list(SHAPED_ROWS[answer_format])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = yaml.safe_load((ROOT / "conf/data" / name).read_text())["data"]
    for role, (path, config_name, split, answer_format) in DATA_CONFIGS[name].items():
        source = HFDatasetSource(**data[role]["init_args"])
        assert calls[-1] == (path, config_name, split) and source.answer_format == answer_format
        assert source.item(0).prompt.endswith(DEFAULT_INSTRUCTION) and source.item(0).answer


@needs_champ
def test_champ_config_builds_the_gradeable_set() -> None:
    data = yaml.safe_load((ROOT / "conf/data/champ.yaml").read_text())["data"]
    assert ChampSource(**data["val_source"]["init_args"]).size == 228
