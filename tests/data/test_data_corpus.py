"""Corpus reading and the errors users get for bad data."""
import json

import pytest

from moe_dist.data import DataError, iter_documents
from moe_dist.data.corpus import builtin_text


def docs(path, **kw):
    return list(iter_documents(str(path), **kw))


def test_builtin_pydoc_is_real_documentation():
    text = builtin_text("pydoc")
    # Python 3.11's pydoc_data.topics is ~466 KB; other versions differ a little.
    assert len(text.encode()) > 300_000
    assert "assert" in text and "\x00" not in text
    assert docs("builtin:pydoc") == [text]
    assert builtin_text("pydoc") == text  # deterministic


def test_unknown_builtin():
    with pytest.raises(DataError, match="builtin:pydoc"):
        docs("builtin:nope")


def test_text_jsonl_and_directory(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("third")
    (tmp_path / "empty.txt").write_text("")  # skipped inside a directory
    (tmp_path / ".hidden").write_text("never read")
    assert docs(tmp_path) == ["one", "two", "second file\n", "third"]
    assert docs(tmp_path / "a.jsonl") == ["one", "two"]


def test_json_and_ndjson_files_are_json_lines_not_text(tmp_path):
    """They used to be trained on as raw text: 3000 records became one document of JSON syntax."""
    (tmp_path / "a.json").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000)))
    (tmp_path / "b.ndjson").write_text('{"text": "last"}\n')
    assert docs(tmp_path) == [f"doc {i}" for i in range(3000)] + ["last"]
    array = tmp_path / "array" / "records.json"
    array.parent.mkdir()
    array.write_text(json.dumps([{"text": "x"}], indent=2))
    with pytest.raises(DataError, match=r"records\.json: one JSON array, but a \.json file is read as JSON lines.*"
                                        r"jq -c '\.\[\]'"):
        docs(array)
    (tmp_path / "c.ndjson").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"c\.ndjson:2: not valid JSON"):
        docs(tmp_path / "c.ndjson")


def test_jsonl_custom_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"body": "hello"}) + "\n")
    assert docs(f, jsonl_field="body") == ["hello"]


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nope.txt.*no such file"):
        iter_documents(str(tmp_path / "nope.txt"))  # raised at once, not at first next()


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(DataError, match=r"empty\.txt: empty file"):
        docs(f)


def test_directory_without_documents(tmp_path):
    with pytest.raises(DataError, match="directory has no files"):
        docs(tmp_path)
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"no documents in 2 file"):
        docs(tmp_path)


def test_binary_file_names_byte_offset(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"abc\x00def")
    with pytest.raises(DataError, match=r"model\.bin: binary data \(NUL byte at byte offset 3\)"):
        docs(f)
    g = tmp_path / "latin1.txt"
    g.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt: not valid UTF-8 \(bad byte 0xe9 at byte offset 3\)"):
        docs(g)


def test_binary_file_in_directory_is_named(tmp_path):
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "zz.dat").write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match=r"zz\.dat: not valid UTF-8"):
        docs(tmp_path)


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"bad\.jsonl:2: not valid JSON"),
    ('["a list"]', r"bad\.jsonl:2: expected a JSON object, got list"),
    ('{"body": "x"}', r"bad\.jsonl:2: missing field 'text' \(keys: body\).*data\.jsonl_field"),
    ('{"text": 5}', r"bad\.jsonl:2: field 'text' is int, not a string"),
    ('{"text": "a\\u0000b"}', r"bad\.jsonl:2: .*NUL"),
])
def test_malformed_jsonl_line(tmp_path, line, message):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "first"}\n' + line + "\n")
    with pytest.raises(DataError, match=message) as e:
        docs(f)
    err = e.value  # no chained traceback from inside the JSON parser
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
