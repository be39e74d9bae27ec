"""Structured outputs against a running `tessera serve`, through the official OpenAI client.

Usage: structured_outputs.py BASE_URL MODEL

100 JSON schemas made at random (seeded: the same every run) from the shapes clients send (nested objects,
arrays with bounds, enums, consts, integers and numbers with bounds, required fields,
`additionalProperties: false`, anyOf; strings bounded by `maxLength`, an enum or a pattern, since a random
model never ends a free string), each asked for through `response_format` (half streamed, half not,
half on /v1/chat/completions and half on /v1/completions); every answer must finish with "stop" and
validate against its schema with `jsonschema`. Then vLLM's `structured_outputs` with `regex` and `choice`,
and `json_object`. The model is a random one that never writes JSON on its own. Exits non-zero, listing
every failure, if any answer does not hold.
"""

import json
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai

BASE, MODEL = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=120)
rng = random.Random(20261205)
MAX_TOKENS = 600


def word():
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 6)))


def leaf():
    kind = rng.choice(["string", "enum", "integer", "number", "boolean", "null", "const", "pattern", "mixed_enum"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 10)}
    if kind == "enum":
        return {"type": "string", "enum": list({word() for _ in range(rng.randint(1, 4))})}
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "number":
        lo = round(rng.uniform(-100, 100), 2)
        s = {"type": "number", "minimum": lo, "maximum": lo + round(rng.uniform(0.5, 50), 2)}
        if rng.random() < 0.3:
            s["exclusiveMaximum"] = s.pop("maximum")
        return s
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "const":
        return {"const": rng.choice([word(), rng.randint(0, 9), True, None])}
    if kind == "pattern":
        return {"type": "string", "pattern": rng.choice(["^[a-z]{2,5}$", "^[0-9]{3}-[0-9]{4}$", "^(yes|no)$"])}
    return {"enum": [word(), rng.randint(-5, 5), False]}


def schema(depth=0):
    r = rng.random()
    if depth >= 3 or r < 0.35:
        return leaf()
    if r < 0.55:
        s = {"type": "array", "items": schema(depth + 1), "maxItems": rng.randint(1, 4)}
        s["minItems"] = rng.randint(0, s["maxItems"])
        return s
    if r < 0.62:
        return {"anyOf": [leaf(), leaf()]}
    names = list({word() for _ in range(rng.randint(1, 4))})
    s = {"type": "object", "properties": {n: schema(depth + 1) for n in names}}
    s["required"] = [n for n in names if rng.random() < 0.7]
    # Closed, as OpenAI's strict mode requires: an open object lets a random model add keys, and a key is a
    # string it never ends.
    s["additionalProperties"] = False
    return s


def top_schema():
    # Objects at the top, as OpenAI requires of json_schema (and as clients send them).
    s = schema(1)
    if s.get("type") != "object":
        s = {"type": "object", "properties": {"value": s}, "required": ["value"], "additionalProperties": False}
    return s


def ask(endpoint, stream, seed, extra):
    """The text and finish reason of one request."""
    if endpoint == "chat":
        args = dict(model=MODEL, messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=MAX_TOKENS, seed=seed)
        if stream:
            text, finish = "", None
            for chunk in client.chat.completions.create(stream=True, **args, **extra):
                for c in chunk.choices:
                    text += c.delta.content or ""
                    finish = c.finish_reason or finish
            return text, finish
        r = client.chat.completions.create(**args, **extra)
        return r.choices[0].message.content, r.choices[0].finish_reason
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=MAX_TOKENS, seed=seed)
    if stream:
        text, finish = "", None
        for chunk in client.completions.create(stream=True, **args, **extra):
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
        return text, finish
    r = client.completions.create(**args, **extra)
    return r.choices[0].text, r.choices[0].finish_reason


def case_schema(i, s):
    fmt = {"type": "json_schema", "json_schema": {"name": f"case_{i}", "schema": s, "strict": True}}
    endpoint = "chat" if i % 4 < 2 else "completions"
    stream = i % 2 == 1
    # The chat client takes response_format as a parameter; completions get it in the body, as vLLM takes it.
    extra = {"response_format": fmt} if endpoint == "chat" else {"extra_body": {"response_format": fmt}}
    text, finish = ask(endpoint, stream, i, extra)
    where = f"schema {i} ({endpoint}, stream={stream}): {json.dumps(s)}\n  got {text!r}"
    if finish != "stop":
        return f"{where}\n  finish_reason {finish}"
    try:
        jsonschema.validate(json.loads(text), s, cls=jsonschema.Draft202012Validator)
    except (ValueError, jsonschema.ValidationError) as e:
        return f"{where}\n  {str(e).splitlines()[0]}"
    return None


def case_regex(i, rx):
    stream = i % 2 == 1
    text, finish = ask("completions", stream, 1000 + i, {"extra_body": {"structured_outputs": {"regex": rx}}})
    if finish != "stop" or not re.fullmatch(rx, text):
        return f"regex {rx!r} (stream={stream}): got {text!r}, finish_reason {finish}"
    return None


def case_choice(i, options):
    stream = i % 2 == 1
    text, finish = ask("chat", stream, 2000 + i, {"extra_body": {"structured_outputs": {"choice": options}}})
    if finish != "stop" or text not in options:
        return f"choice {options} (stream={stream}): got {text!r}, finish_reason {finish}"
    return None


schemas = [top_schema() for _ in range(100)]
regexes = [r"[0-9]{3}-[a-z]{4}", r"(true|false)", r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}\.", r"[0-9]+(\.[0-9]{1,3})?", r"#[0-9a-f]{6}"]
choices = [["yes", "no"], ["red", "green", "blue", "bright yellow"], ["Paris", "Ünïcødé ✓", "a \"quoted\" one"]]

jobs = [lambda i=i, s=s: case_schema(i, s) for i, s in enumerate(schemas)]
jobs += [lambda i=i, rx=rx: case_regex(i, rx) for i, rx in enumerate(regexes * 2)]
jobs += [lambda i=i, c=c: case_choice(i, c) for i, c in enumerate(choices * 2)]
with ThreadPoolExecutor(8) as pool:
    failures = [f for f in pool.map(lambda j: j(), jobs) if f]
for f in failures:
    print(f)
print(f"{len(jobs) - len(failures)} of {len(jobs)} structured outputs held")
sys.exit(1 if failures else 0)
