"""Structured output (grammar.py): every constrained reply of the test checkpoints, whose random weights
never write JSON on their own, parses with json.loads and validates with the jsonschema library (an
independent checker), in generate, the batch, the CLIs and the server through the real openai client's
parse(); bad schemas are one clear 4xx before any work."""

import json
from itertools import islice
from typing import Annotated, List, Literal

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import batch
import chat
import grammar
import mixtral
from conftest import Server, assert_one_line_error, examples, run_script

BOUNDED = dict(minimum=-50, maximum=50)  # a random model would write digits for ever otherwise

SCHEMAS = {
    "required, enum, additionalProperties": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "mood": {"enum": ["bored", "annoyed", "asleep"]},
            "note": {"type": "string", "maxLength": 6},
        },
        "required": ["name", "age", "mood"],
        "additionalProperties": False,
    },
    "$ref and $defs": {
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", **BOUNDED}, "y": {"type": "integer", **BOUNDED}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "anyOf at the top": {"anyOf": [{"type": "integer", **BOUNDED}, {"type": "boolean"}, {"const": "none"}]},
    "array of enums, min and max items": {
        "type": "array",
        "items": {"enum": ["red", "green", "blue"]},
        "minItems": 2,
        "maxItems": 4,
    },
    "string formats": {
        "type": "object",
        "properties": {
            "day": {"type": "string", "format": "date"},
            "v6": {"type": "string", "format": "ipv6"},
            "id": {"type": "string", "format": "uuid"},
            "host": {"type": "string", "format": "ipv4"},
        },
        "required": ["day", "v6", "id", "host"],
        "additionalProperties": False,
    },
    "nested arrays and optional keys": {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "items": {"type": "array", "items": {"type": "integer", **BOUNDED}, "maxItems": 3},
                "maxItems": 3,
            },
            "ok": {"type": "boolean"},
            "pattern": {"type": "string", "pattern": "^[a-z]{2,5}-[0-9]{2}$"},
        },
        "required": ["ok", "pattern"],
        "additionalProperties": False,
    },
}

PROMPT = "[INST] Describe a person as JSON. [/INST]"


@pytest.fixture(scope="module")
def model(mlx_q8):
    return mixtral.load_model(mlx_q8)[0]


def constrained(model, tokenizer, schema, temp=0.8, seed=0, n=400, prompt=PROMPT):
    """generate() under the schema's grammar -> (text, whether it ended with EOS)."""
    c = grammar.Constraint(tokenizer, grammar.compile_schema(schema))
    ids = []
    for y in islice(mixtral.generate(model, tokenizer.encode(prompt), temp=temp, seed=seed, constraint=c), n):
        if y == tokenizer.eos_id:
            return tokenizer.decode(ids), True
        ids.append(y)
    return tokenizer.decode(ids), False


def assert_valid(text, schema):
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


# --------------------------------------------------------------------------- the vocabulary


@pytest.mark.parametrize("text", ['{"a": [1, 2.5, null]}', "  line\n\tbreaks ", "Emoji 😀 and 你好", "<s> [INST]"])
def test_the_token_bytes_spell_what_sentencepiece_decodes(tokenizer, text):
    # Independent of grammar.py: sentencepiece's own decoding of the same ids (its leading space kept).
    table = grammar.token_bytes(tokenizer._sp)
    ids = tokenizer.encode(text, bos=False)
    assert b"".join(table[i] for i in ids) == (" " + text).encode()
    assert table[tokenizer.eos_id] == b"\xff</s>" and table[tokenizer.bos_id] == b"\xff<s>"


def test_text_inside_a_reply_is_tokenized_without_sentencepieces_leading_space(tokenizer):
    vocab = grammar._Vocabulary(tokenizer)
    for text in ['{"a": 1}', "hello world", "\n{"]:
        assert b"".join(vocab.tokens[i] for i in vocab(text)) == text.encode()


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("temp, seed", [(0.0, 0), (0.9, 1), (0.9, 2)])
def test_every_constrained_reply_parses_and_validates(model, tokenizer, name, temp, seed):
    text, ended = constrained(model, tokenizer, SCHEMAS[name], temp, seed)
    assert ended, text  # EOS came, where the JSON was complete
    assert_valid(text, SCHEMAS[name])


def test_without_a_grammar_the_weights_write_no_json(model, tokenizer):
    # What the tests above prove is the grammar's doing, not the weights'.
    text = tokenizer.decode(islice(mixtral.generate(model, tokenizer.encode(PROMPT)), 40))
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_object_mode_gives_an_object(model, tokenizer):
    c = grammar.Constraint(tokenizer, grammar.compile_format({"type": "json_object"}))
    ids = list(islice(mixtral.generate(model, tokenizer.encode(PROMPT), constraint=c), 6))
    assert tokenizer.decode(ids).startswith("{") and tokenizer.eos_id not in ids


def test_the_same_greedy_request_twice_gives_the_same_reply(model, tokenizer):
    schema = SCHEMAS["$ref and $defs"]
    assert constrained(model, tokenizer, schema, 0.0) == constrained(model, tokenizer, schema, 0.0)


def leaf():
    return st.one_of(
        st.just({"type": "boolean"}),
        st.builds(
            lambda a, b: {"type": "integer", "minimum": min(a, b), "maximum": max(a, b)}, *[st.integers(-99, 99)] * 2
        ),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
        st.lists(st.sampled_from(["a", "bb", "c c", 'q"uote', "é"]), min_size=1, max_size=4, unique=True).map(
            lambda v: {"enum": v}
        ),
        st.just({"type": "null"}),
    )


def compound(children):
    key = st.sampled_from(["a", "b", "name", "x y", "é"])
    return st.one_of(
        st.builds(lambda items, n: {"type": "array", "items": items, "maxItems": n}, children, st.integers(0, 3)),
        st.dictionaries(key, children, max_size=3).flatmap(
            lambda props: st.builds(
                lambda required: {
                    "type": "object",
                    "properties": props,
                    "required": sorted(required),
                    "additionalProperties": False,
                },
                st.sets(st.sampled_from(sorted(props)), max_size=len(props)) if props else st.just(set()),
            )
        ),
        st.lists(children, min_size=2, max_size=3).map(lambda options: {"anyOf": options}),
    )


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=st.recursive(leaf(), compound, max_leaves=6), temp=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 99))
def test_replies_to_generated_schemas_validate(model, tokenizer, schema, temp, seed):
    text, ended = constrained(model, tokenizer, schema, temp, seed, n=300)
    assert ended, (schema, text)
    assert_valid(text, schema)


# --------------------------------------------------------------------------- the batch


def test_constrained_and_free_replies_decoded_together_equal_each_alone(model, tokenizer):
    """A mask per sequence: sequences with and without a grammar in one batch get what each gets alone."""
    requests = [(SCHEMAS["required, enum, additionalProperties"], 0.0), (None, 0.0), (SCHEMAS["$ref and $defs"], 0.9)]
    requests += [(SCHEMAS["array of enums, min and max items"], 0.9), (None, 0.9)]

    def run(together):
        replies = {}
        b = batch.Batch(model, tokenizer.eos_id, size=8)
        for i, (schema, temp) in enumerate(requests):
            rules = grammar.Constraint(tokenizer, grammar.compile_schema(schema)) if schema else None
            s = batch.Sequence(
                model.make_cache(), tokenizer.encode(f"{PROMPT} {i}"), 120, temp=temp, seed=i, constraint=rules
            )
            s.on_end = lambda s, i=i: replies.__setitem__(i, (tokenizer.decode(s.ids), s.finish_reason))
            b.add(s)
            if not together:
                while b.busy:
                    b.step()
        while b.busy:
            b.step()
        return replies

    alone, together = run(False), run(True)
    assert together == alone
    for i, (schema, _) in enumerate(requests):
        if schema:
            assert together[i][1] == "stop"
            assert_valid(together[i][0], schema)


# --------------------------------------------------------------------------- the CLIs


@pytest.fixture
def schema_file(tmp_path):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(SCHEMAS["required, enum, additionalProperties"]))
    return path


def test_the_one_shot_cli_follows_a_schema_file(mlx_q8, schema_file):
    r = run_script(
        "mixtral.py", "--model-path", mlx_q8, "--prompt", PROMPT, "--json-schema", schema_file, "--max-tokens", 200
    )
    assert r.returncode == 0, r.stderr
    assert_valid(r.stdout, SCHEMAS["required, enum, additionalProperties"])


def test_every_chat_reply_follows_the_schema_and_json_gives_objects(tmp_path, mlx_q8, schema_file):
    talk = tmp_path / "talk.json"
    r = run_script(
        "chat.py", "--model-path", mlx_q8, "--json-schema", schema_file, stdin=f"hello\nand again\n/save {talk}\n"
    )
    replies = [m["content"] for m in json.loads(talk.read_text())["messages"] if m["role"] == "assistant"]
    assert r.returncode == 0 and len(replies) == 2 and r.stdout == "".join(f"{t}\n" for t in replies), r.stderr
    for text in replies:
        assert_valid(text, SCHEMAS["required, enum, additionalProperties"])
    r = run_script("chat.py", "--model-path", mlx_q8, "--json", "--max-tokens", 8, stdin="hello\n")
    assert r.returncode == 0 and r.stdout.startswith("{"), r.stderr


@pytest.mark.parametrize(
    "content, says",
    [
        ("{not json", "is not JSON"),
        ('{"type": "string", "format": "no-such-format"}', "no-such-format"),
        ("[1, 2]", "must be a JSON object"),
        ('{"items": ' * 100 + "{}" + "}" * 100, "nests deeper"),
    ],
)
def test_a_schema_file_that_cannot_be_used_is_one_line_before_loading(tmp_path, mlx_q8, content, says):
    path = tmp_path / "bad.json"
    path.write_text(content)
    r = run_script("chat.py", "--model-path", mlx_q8, "--json-schema", path, "--prompt", "hi")
    assert_one_line_error(r, str(path), says)
    assert "[load]" not in r.stderr


# --------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server(mlx_q8):
    s = Server(mlx_q8, "--max-context", 1024)
    yield s
    code, log = s.stop()
    assert code == 143 and "Traceback" not in log, log


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    mood: Literal["bored", "annoyed"]
    friends: List[Annotated[str, Field(max_length=8)]] = Field(max_length=2)


def test_the_openai_clients_parse_returns_a_populated_pydantic_object(server):
    r = server.client.chat.completions.parse(
        model="q8",
        messages=[{"role": "user", "content": "Who are you? Answer as JSON."}],
        response_format=Person,
        max_tokens=300,
        temperature=0.7,
        seed=3,
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and r.choices[0].finish_reason == "stop", r
    assert person.mood in ("bored", "annoyed") and 0 <= person.age <= 120


def schema_format(name):
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_and_whole_replies_follow_the_schema_and_greedy_ones_repeat(server, kind):
    name = "nested arrays and optional keys"
    texts = []
    for stream in (False, True, False):
        if kind == "chat":
            args = dict(model="q8", messages=[{"role": "user", "content": "Some JSON, please."}])
            create, content = server.client.chat.completions.create, lambda c: c.message.content
            delta = lambda c: c.delta.content or ""
        else:
            args = dict(model="q8", prompt=PROMPT)
            create, content, delta = server.client.completions.create, lambda c: c.text, lambda c: c.text
        # (the SDK's completions.create has no response_format argument: it goes as the body's own field)
        fmt = {"extra_body": {"response_format": schema_format(name)}}
        r = create(**args, **fmt, max_tokens=300, temperature=0, stream=stream)
        texts.append("".join(delta(c.choices[0]) for c in r if c.choices) if stream else content(r.choices[0]))
    assert texts[0] == texts[1] == texts[2], texts
    assert_valid(texts[0], SCHEMAS[name])


def test_a_reply_cut_by_max_tokens_says_length(server):
    r = server.client.chat.completions.create(
        model="q8",
        messages=[{"role": "user", "content": "hi"}],
        response_format=schema_format("string formats"),
        max_tokens=5,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_a_request_without_response_format_gets_todays_reply(server, model, tokenizer):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    ids = list(islice(mixtral.generate(model, chat.encode_messages(tokenizer, messages)), 12))
    r = server.client.chat.completions.create(model="q8", messages=messages, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == tokenizer.decode(ids)
    plain = server.client.chat.completions.create(
        model="q8", messages=messages, max_tokens=12, temperature=0, response_format={"type": "text"}
    )
    assert plain.choices[0].message.content == r.choices[0].message.content


def deep(n):
    schema = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


BAD_FORMATS = {
    "unknown type": ({"type": "xml"}, 400, "is not supported"),
    "no schema": ({"type": "json_schema", "json_schema": {"name": "x"}}, 400, "must be an object with a 'schema'"),
    "not a schema": ({"type": "json_schema", "json_schema": {"schema": [1]}}, 400, "must be a JSON object"),
    "invalid schema": ({"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}, 400, "strnig"),
    "unsupported format": (
        {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "hostname-x"}}},
        400,
        "hostname-x",
    ),
    "nested 100 deep": ({"type": "json_schema", "json_schema": {"schema": deep(100)}}, 400, "nests deeper"),
    "not an object": ("json", 400, "must be an object"),
}


@pytest.mark.parametrize("case", list(BAD_FORMATS))
def test_a_response_format_that_cannot_be_used_is_a_400_before_any_work(server, case):
    response_format, status, says = BAD_FORMATS[case]
    before = server.http.get("/health").json()["generations"]
    r = server.post(
        "/v1/chat/completions",
        body={"messages": [{"role": "user", "content": "hi"}], "response_format": response_format},
    )
    assert r.status_code == status and says in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "response_format" and r.json()["error"]["type"] == "invalid_request_error"
    assert server.http.get("/health").json()["generations"] == before


@pytest.mark.parametrize(
    "body, status",
    [
        # A 5 MB schema: past the body limit, refused unread (413).
        (
            b'{"response_format": {"type": "json_schema", "json_schema": {"schema": {"enum": ["'
            + b"x" * 5 * 2**20
            + b'"]}}}}',
            413,
        ),
        # Nested 10,000 deep: too deep to read, one 400 (never a crash of the server's stack).
        (
            b'{"response_format": {"type": "json_schema", "json_schema": {"schema": '
            + b"[" * 10000
            + b"]" * 10000
            + b"}}}",
            400,
        ),
    ],
    ids=["5 MB", "10,000 deep"],
)
def test_a_huge_or_deep_schema_is_refused_and_the_server_goes_on(server, body, status):
    before = server.http.get("/health").json()["generations"]
    r = server.post("/v1/chat/completions", content=body)
    assert r.status_code == status and r.json()["error"]["message"], r.text
    assert server.http.get("/health").json()["generations"] == before
    ok = server.client.chat.completions.create(model="q8", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_the_mask_allows_eos_only_where_the_json_is_complete(tokenizer):
    c = grammar.Constraint(tokenizer, grammar.compile_schema({"type": "array", "items": {"type": "integer"}}))
    allowed = lambda: np.array(c.mask())
    assert not allowed()[tokenizer.eos_id]
    for piece in ["[", "1", "]"]:
        c.accept(tokenizer._sp.piece_to_id(piece))
    assert allowed()[tokenizer.eos_id] and c.done
    assert mx.array(allowed()).sum().item() == 1  # nothing but EOS after the closing bracket
