"""make_jinja_goldens.py — renders the templates of jinja_cases.json with Python Jinja2 configured
as transformers configures it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks,
loopcontrols, {% generation %}, transformers' tojson, raise_exception, strftime_now at
2025-07-10T12:00:00Z in UTC) and writes jinja_goldens.json: for each case either the output or
that it raised (and the exception type). test_jinja.c compares tuna with these.

Run: python3 tests/data/make_jinja_goldens.py   (needs jinja2; made with Jinja2 3.1.6)
"""
import copy
import json
import re
import os
import time
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

os.environ["TZ"] = "UTC"
time.tzset()
NOW = 1752148800


class AssistantTracker(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.fromtimestamp(NOW).strftime(fmt)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[AssistantTracker, loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

here = os.path.dirname(os.path.abspath(__file__))
doc = json.load(open(os.path.join(here, "jinja_cases.json")))
out = []
for c in doc["cases"]:
    try:
        ctx = copy.deepcopy(doc["contexts"][c["context"]])
        text = env.from_string(c["template"]).render(**ctx)
        # memory addresses ("<generator object ... at 0x7f...>") change from run to run
        r = {"id": c["id"], "output": re.sub(r" at 0x[0-9a-f]+>", " at 0x?>", text)}
    except Exception as e:  # the reference raised: tuna must fail too
        r = {"id": c["id"], "raises": type(e).__name__}
    out.append(r)
with open(os.path.join(here, "jinja_goldens.json"), "w") as f:
    json.dump({"generator": "make_jinja_goldens.py with Jinja2 " + jinja2.__version__, "cases": out}, f, indent=0,
              ensure_ascii=False)
print(len(out), "cases")
