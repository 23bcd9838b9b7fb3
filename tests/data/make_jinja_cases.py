"""make_jinja_cases.py — writes jinja_cases.json: hand-written edge cases of the Jinja features chat
templates use, plus random expressions and random whitespace-control layouts (fixed seeds).
Expected outputs come from Python Jinja2: run make_jinja_goldens.py afterwards."""
import json
import random

T = []
CONTEXTS = {}


def add(tpl, ctx=None, name="C"):
    CONTEXTS.setdefault(name, ctx or {})
    T.append({"template": tpl, "context": name})

msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \"you\" 'there'\n"}, {"role": "assistant", "content": "Hello!", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1, "b": [1.5, None, True]}}}]}, {"role": "tool", "content": "42"}]
C = {"messages": msgs, "n": 7, "f": 2.5, "s": "Hello World", "u": "héllo wörld ñ", "l": [3, 1, 2], "d": {"b": 2, "a": 1, "c": None}, "e": [], "z": 0, "t": True, "none": None, "nested": {"x": {"y": [10, 20, {"z": "deep"}]}}}
# printing
for e in ["1.0", "0.1", "1e-05", "1e16", "123456789.123", "1/3", "2/2", "-0.0", "3 * 1.1", "10 ** 20", "2 ** -1", "7 // 2", "-7 // 2", "7.5 // 2", "-7 % 3", "7 % -3", "5.5 % 2", "true", "none", "[1, 'a', none, true, 1.5]", "{'a': 1, 'b': [1, 2]}", "(1,)", "(1, 2)", "()", "'it''s'", "\"it's\"", "'say \"hi\"'", "'a\\nb'", "'tab\\tx'", "[\"it's\"]", "['a\\nb']", "{'k': \"q'\\\"\"}", "d", "l", "e", "s", "nested", "messages[2]", "n / 0", "1 + 'a'", "'a' * 3", "[1] * 2", "[1, 2] + [3]", "'ab' + 'c'", "n + f", "true + 1", "- n", "not n", "n and s", "z or 'x'", "z and 'x'", "none or e", "'x' if z else 'y'", "'x' if n", "(('a' if z))"]:
    add("{{ " + e + " }}", C)
# comparisons & membership
for e in ["1 < 2 < 3", "3 > 2 > 2", "1 == 1.0", "true == 1", "'a' < 'b'", "[1, 2] < [1, 3]", "'a' in s", "'W' in s", "'b' in d", "2 in l", "none in l", "'x' not in d", "1 in e", "'é' in u", "n > 'a'", "none == none", "undefined_var == none", "undefined_var is none", "d.c is none", "d.zz is defined", "n is number", "f is float", "f is integer", "t is boolean", "s is string", "d is mapping", "l is sequence", "s is iterable", "n is odd", "n is divisibleby 7", "l is iterable", "none is none", "t is true", "z is false", "s is lower", "'ABC' is upper", "1 is sameas 1", "l|length is eq 3", "n is gt 3", "n is lt 3", "n is ge 7", "n is in [7]", "'upper' is filter", "'odd' is test"]:
    add("{{ " + e + " }}", C)
# filters
for e in ["s|upper", "s|lower", "u|upper", "u|title", "'hello-world (x)'|title", "\"they're bill's\"|title", "s|capitalize", "u|capitalize", "'  x  '|trim", "'xxhixx'|trim('x')", "s|length", "u|length", "d|length", "l|first", "l|last", "s|first", "e|first", "l|sort", "l|sort(reverse=true)", "['b', 'A', 'c']|sort", "['b', 'A', 'c']|sort(case_sensitive=true)", "l|sort|list", "l|reverse|list", "s|reverse", "l|join(', ')", "l|join", "[1, none, 'x']|join('-')", "l|sum", "[1.5, 2]|sum", "l|min", "l|max", "['b', 'A']|min", "d|dictsort", "d|dictsort(reverse=true)", "{'b': 1, 'a': 2}|dictsort(by='value')", "d|items|list", "d.items()|list", "d.keys()|list", "d.values()|list", "d.items()", "d.keys()", "d|list", "s|list", "range(3)", "range(1, 10, 3)|list", "range(3)|length", "range(5)[1]", "l|map('string')|list", "messages|map(attribute='role')|list", "messages|map(attribute='zz', default='?')|list", "messages|selectattr('role', 'equalto', 'user')|list|length", "messages|rejectattr('role', 'in', ['user', 'tool'])|map(attribute='role')|join(',')", "messages|selectattr('tool_calls')|list|length", "messages|selectattr('tool_calls', 'defined')|list|length", "[1, 2, 3, 4]|select('odd')|list", "[1, 2, 3, 4]|reject('divisibleby', 2)|list", "[1, 2, 3]|select('gt', 1)|list", "['a', 'A', 'b']|unique|list", "['a', 'A', 'b']|unique(case_sensitive=true)|list", "[1, 2, 3, 4, 5]|batch(2)|list", "[1, 2, 3]|batch(2, 'x')|list", "'3'|int + 1", "'3.7'|int", "'abc'|int", "'abc'|int(5)", "3.9|int", "'0x1f'|int(0, 16)", "'1.5'|float", "'x'|float", "n|float", "2.567|round", "2.567|round(2)", "2.5|round", "3.5|round", "2.567|round(1, 'floor')", "2.561|round(1, 'ceil')", "7|round", "-3|abs", "-2.5|abs", "none|string", "l|string", "s|replace('o', '0')", "s|replace('o', '0', 1)", "'%s is %d'|format('x', 3)", "'a'|default('b')", "undefined_var|default('b')", "none|default('b')", "''|default('b', true)", "undefined_var|d", "l|tojson", "d|tojson", "d|tojson(indent=2)", "nested|tojson(indent=2)", "d|tojson(sort_keys=true)", "d|tojson(separators=(',', ':'))", "u|tojson", "u|tojson(ensure_ascii=true)", "'\\u2028<>&\\''|tojson", "[1.0, 2.5e-9, 1e22]|tojson", "e|tojson(indent=2)", "{}|tojson(indent=2)", "messages|tojson", "'a\\nb\\n\\nc'|indent", "'a\\nb\\n\\nc'|indent(2, true)", "'a\\nb\\n\\nc'|indent(2, blank=true)", "'a\\nb'|indent('> ')", "'x\\n'|indent(first=true)", "'<a href=\"x\">&</a>'|e", "'<b>'|safe", "'one two  three'|wordcount", "'x'|center(5)", "d|attr('b')", "s|count", "messages[1].content|trim|length"]:
    add("{{ " + e + " }}", C)
# string methods
for e in ["s.split()", "'  a  b '.split()", "'a,b,,c'.split(',')", "'a b c'.split(' ', 1)", "'a b c'.rsplit(' ', 1)", "'a,b'.rsplit(',')", "s.startswith('Hell')", "s.endswith(('x', 'ld'))", "s.lower()", "s.upper()", "u.title()", "\"they're\".title()", "'x'.join(['a', 'b'])", "s.replace('l', 'L', 2)", "'aaa'.replace('', '-')", "s.find('o')", "s.rfind('o')", "s.count('l')", "s.index('W')", "'  x '.strip()", "'--x-'.strip('-')", "'--x-'.lstrip('-')", "'--x-'.rstrip('-')", "'{} and {}'.format(1, 'b')", "'{0}{0}'.format('r')", "'{name}!'.format(name='N')", "'a\\nb\\r\\nc'.splitlines()", "'123'.isdigit()", "'abc'.isalpha()", "' '.isspace()", "'Ab'.islower()", "'hello'.capitalize()", "s[0]", "s[-1]", "s[1:4]", "s[::-1]", "s[::2]", "u[1:3]", "l[-1]", "l[5]", "l[1:]", "l[:-1]", "l[::-1]", "l[10:]", "messages[-1].content", "messages[0]['role']", "d['zz']", "d.zz", "nested.x.y[2].z", "nested['x']['y'][-1]['z']", "d.get('a')", "d.get('zz', 5)", "d.get('zz')", "s.zz", "n.zz", "none.zz", "undefined_var.zz", "undefined_var[0]", "l.zz"]:
    add("{{ " + e + " }}", C)
# statements, scoping, whitespace
stmts = [
 "{% for m in messages %}{{ loop.index }}/{{ loop.length }}:{{ m.role }}{% if not loop.last %}, {% endif %}{% endfor %}",
 "{% for m in messages if m.role != 'system' %}{{ loop.index0 }}{{ m.role }}{{ loop.revindex }} {% endfor %}",
 "{% for x in e %}no{% else %}empty{% endfor %}",
 "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}",
 "{% for k in d %}{{ k }}{% endfor %}",
 "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
 "{% for x in l %}{{ loop.previtem }}-{{ x }}-{{ loop.nextitem }}|{% endfor %}",
 "{% for x in l %}{{ loop.cycle('a', 'b') }}{% endfor %}",
 "{% for x in [1, 2, 3, 4] %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 4 %}{% break %}{% endif %}{{ x }}{% endfor %}",
 "{% for i in range(2) %}{% for j in range(2) %}{{ loop.index }}{{ i }}{{ j }} {% endfor %}{{ loop.index }}|{% endfor %}",
 "{% set x = 1 %}{% for i in l %}{% set x = x + i %}{{ x }}{% endfor %}{{ x }}",
 "{% set ns = namespace(x=1) %}{% for i in l %}{% set ns.x = ns.x + i %}{% endfor %}{{ ns.x }}",
 "{% set ns = namespace() %}{% set ns.a = 'v' %}{{ ns.a }}{{ ns.b }}",
 "{% if n > 5 %}big{% elif n > 2 %}mid{% else %}small{% endif %}",
 "{% if z %}a{% elif none %}b{% endif %}c",
 "{% set a, b = 1, 2 %}{{ a }}{{ b }}",
 "{% set x %}block {{ n }}{% endset %}[{{ x }}]",
 "{% set x | upper %}block{% endset %}{{ x }}",
 "{% macro m(a, b='B', c=none) %}{{ a }}{{ b }}{{ c }}{% endmacro %}{{ m(1) }}|{{ m(1, 2, 3) }}|{{ m(b=5, a=0) }}",
 "{% macro m(a) %}{{ a }}{{ n }}{% endmacro %}{% set n = 99 %}{{ m(1) }}",
 "{% macro w() %}<{{ caller() }}>{% endmacro %}{% call w() %}in {{ n }}{% endcall %}",
 "{% macro w(x) %}{{ caller(x * 2) }}{% endmacro %}{% call(v) w(4) %}v={{ v }}{% endcall %}",
 "{% macro m() %}x{% endmacro %}{{ m() ~ m() }}{{ m() + 'y' }}",
 "{% filter upper %}abc {{ s }}{% endfilter %}",
 "{% raw %}{{ not parsed }}{% endraw %}",
 "a{# comment #}b{#- trimmed -#}  c",
 "  {% if true %}\n    x\n  {% endif %}\n",
 "{% for i in l %}\n  {{ i }}\n{% endfor %}\n",
 "{%- for i in l -%}\n  {{ i }}\n{%- endfor -%}\n",
 "a  {{- ' b ' -}}  c",
 "  {%+ if true %}k{% endif %}",
 "{% if true +%}\nkept{% endif %}",
 "line1\n  {%- if true %} x {% endif -%}\n  line2",
 "{{ raise_exception('boom') }}",
 "{{ strftime_now('%Y-%m-%d %H:%M %b %B %a %A %d') }}",
 "{% generation %}gen {{ n }}{% endgeneration %}",
 "{{ messages[2].tool_calls[0].function.arguments|tojson }}",
 "{{ messages[2].tool_calls[0].function.arguments.b }}",
 "{% set m = messages[1:] %}{{ m|length }}{{ messages|length }}",
 "{% set msgs = messages %}{% if msgs[0].role == 'system' %}{% set sys = msgs[0].content %}{% set msgs = msgs[1:] %}{% endif %}{{ sys }}|{{ msgs|length }}",
 "{% for m in messages %}{% if m.content is string %}{{ m.content|trim }}{% else %}{{ m.content|tojson }}{% endif %}{% endfor %}",
 "{{ (messages|selectattr('role', 'equalto', 'user')|list|last).content }}",
 "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{{ ns.last }}",
 "{{ dict(a=1, b='x') }}{{ dict(a=1)|tojson }}",
 "{% set j = joiner(', ') %}{% for x in l %}{{ j() }}{{ x }}{% endfor %}",
 "{{ messages|selectattr('role', 'equalto', 'user') }}",
 "{{ l|reverse }}",
 "{{ messages|map(attribute='role')|tojson }}",
 "{% if messages|selectattr('role', 'equalto', 'nobody') %}truthy{% endif %}",
 "{{ (l|select('odd'))[0] }}",
 "{% set g = l|select('odd') %}{{ g|list }}{{ g|list }}",
 "{{ undefined_var }}|{{ undefined_var ~ 'x' }}|{{ undefined_var|length }}|{{ undefined_var|list }}",
 "{{ undefined_var + 1 }}",
 "{% for x in undefined_var %}x{% endfor %}ok",
 "{% for x in none %}x{% endfor %}",
 "{{ l.append(4) }}{{ l }}",
 "{{ 'a' ~ 1 ~ none ~ [1] }}",
 "{{ '%s-%s' % ('a', 1) }}{{ '%d%%' % 5 }}",
 "{{ 'x' if 'a' in {'a': 1} else 'y' }}",
 "{{ {'a': 1}.a }}{{ {'items': 1}.items }}",
 "{{ [1, 2, 3]|map('abs')|sum }}",
 "{% set x = {'a': [1, {'b': 2}]} %}{{ x.a[1].b }}{{ x['a'][0] }}",
 "{{ 'Hi'|safe + '<x>' }}",
 "{{ '<x>' + 'y'|safe }}",
 "{{ ('<a>'|e + '<b>')|length }}",
 "{{ s|truncate(5) }}",
 "{{ 'abc'|map('upper')|join }}",
 "{{ 12345678901234567890 }}",
 "{{ 3 * 'ab' }}{{ 2 * [0] }}",
 "{% macro rec(n) %}{{ n }}{% if n > 0 %}{{ rec(n - 1) }}{% endif %}{% endmacro %}{{ rec(3) }}",
 "{% set tools = none %}{% if tools is not none %}t{% else %}no tools{% endif %}",
 "{{- 'a' -}}\n\n   {{- 'b' }}",
 "{% for m in messages %}{{ '<|' + m.role + '|>\\n' + m.content + '<|end|>\\n' }}{% endfor %}",
 "{{ messages[0].content.split('.')[0] }}",
 "{% set c = messages[2].content %}{{ c.split('</think>')[-1].lstrip('\\n') }}",
 "{{ n|string + 'x' }}{{ f|string }}{{ (0.1 + 0.2)|string }}",
 "{{ 1 if true else 2 if false else 3 }}",
 "{{ not 1 == 2 }}{{ not (1 in [1]) }}{{ 1 not in [2] }}",
 "{{ -1 ** 2 }}{{ (-1) ** 2 }}{{ 2 ** 3 ** 2 }}",
 "{{ 10 - 2 - 3 }}{{ 2 * 3 + 4 }}{{ 2 + 3 * 4 }}{{ 1 ~ 2 + 3 }}",
 "{% if n > 1: %}colon{% else: %}no{% endif %}",
 "{% for i in l: %}{{ i }}{% endfor %}",
 "{{ l[] }}|{{ d[] is defined }}",
 "{{ l[0,] }}",
 "{% set ns = namespace(a=1) %}{% set ns.a, b = 5, 6 %}{{ ns.a }}{{ b }}",
 "{% for a, in [[1]] %}{{ a }}{% endfor %}",
 "{% set a, = [1] %}{{ a }}",
 "{{ dict(*[[['a', 1]]]) }}",
 "{{ 'x'.split(*[','], 1) }}",
 "{{ n | no_such_filter }}",
 "{% if false %}{{ n | no_such_filter }}{% endif %}ok",
 "{% if true %}{{ n | no_such_filter }}{% endif %}",
 "{{ n if false else (n | no_such_filter) }}",
 "{% for i in l %}{% if false %}{{ i | nope }}{% endif %}{% endfor %}ok",
 "{% for i in l %}{{ i | nope if false }}{% endfor %}ok",
 "{{ n is defined(1) }}",
 "{{ n is divisibleby }}",
 "{{ d | tojson(ensur_ascii=true) }}",
 "{{ l | join(',', 'x', 'y') }}",
 "{{ namespace(undefined_var) }}",
 "{{ messages | selectattr('zz.e') | list }}",
 "{% for x in l %}{{ loop | length }}{% endfor %}",
 "{% macro m() %}x{% endmacro %}{% call m() %}y{% endcall %}",
 "{% macro m() %}{{ caller() if caller is defined else 'none' }}{% endmacro %}{{ m() }}",
 "{% set x %}{% set inner = 1 %}{% endset %}{{ inner is defined }}",
 "{% filter upper %}{% set inner = 1 %}a{% endfilter %}{{ inner is defined }}",
 "{{ -2 ** n }}|{{ (-2) ** 2 }}|{{ -2 ** 2 }}|{{ (1 - 3) ** z }}",
 "{{ 0.5 is odd }}{{ 2.0 is even }}{{ 3 is odd }}",
 "{{ 0 | map('string') | list }}{{ none | select | list }}",
 "{{ 'abc' % () }}|{{ 'abc' % {} }}|{{ 'abc' % [] }}",
 "{{ 'abc' % 5 }}",
 "{{ [1] in {'a': 1} }}",
 "{{ {[1]: 2} }}",
 "{{ ((1, 2) * 0) }}{{ [1] * 0 }}",
 "{{ ''.islower() }}{{ '' is lower }}{{ 'A1' is upper }}{{ 1 is lower }}",
 "{{ [none, none] | sort }}{{ [undefined_a, undefined_b] | sort }}",
 "{{ [none, 1] | sort }}",
 "{{ ['b', 'B', 'a'] | sort }}{{ ['b', 'B', 'a'] | unique | list }}",
 "{{ s | truncate(7) }}|{{ s | truncate(7, true) }}|{{ s | truncate(7, end='!') }}|{{ l | truncate(2) }}",
 "{{ s.strip('a', 'b') }}",
 "{{ 0x1F }}|{{ 0o17 }}|{{ 0b101 }}|{{ 1_000 }}|{{ 00 }}|{{ 0_0 }}|{{ 1e3 }}|{{ 1_0.5 }}|{{ 01.5 }}",
 "{{ 01 }}",
 "{% for i in l %}{{ loop }}|{% endfor %}",
 "{{ 0x }}",
 "{% macro m(a=1, b) %}{% endmacro %}x",
 "{{ d | tojson(separators=',:') }}",
 "{{ e | selectattr('a', 'no_such_test') | list }}|{{ e | map('no_such_filter') | list }}",
 "{{ l | selectattr('a', 'no_such_test') | list }}",
 "{{ s.upper(1) }}",
 "{{ d.get([1]) }}",
 "{{ s.split(sep='o') }}|{{ s.split('o', maxsplit=1) }}|{{ s.rsplit('o', 1) }}",
 "{{ s.lower(x=1) }}",
 "{{ d.items(1) }}",
 "{{ d.get('a', 1, 2) }}",
 "{{ 'a b'.join(['x']) }}{{ ','.join(l | map('string')) }}",
]
for t in stmts:
    add(t, C)
# random expressions and whitespace layouts (the fuzzers that compared tuna with Python Jinja2)
FC = {"n": 7, "m": -3, "f": 2.5, "g": -0.5, "s": "Hello World", "u": "héllo", "w": "  pad  ", "l": [3, 1, 2], "ls": ["b", "A", "c"], "d": {"b": 2, "a": 1}, "e": [], "es": "", "z": 0, "t": True, "fa": False, "none": None,
     "msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}
atoms = ["n", "m", "f", "g", "s", "u", "w", "l", "ls", "d", "e", "es", "z", "t", "fa", "none", "msgs", "undefined_x", "1", "0", "-2", "2.0", "0.5", "'a'", "''", "'x y'", "[1, 2]", "[]", "{'k': 1}", "true", "false", "none", "(1, 2)"]
filters = ["length", "upper", "lower", "trim", "string", "list", "first", "last", "sort", "unique|list", "reverse|list", "join(',')", "tojson", "int", "float", "abs", "round", "sum", "min", "max", "capitalize", "title", "default('D')", "default('D', true)", "items|list", "dictsort", "map('string')|list", "select|list", "reject|list", "wordcount", "count", "batch(2)|list", "indent(2)", "replace('l', 'L')", "e", "safe", "center(9)", "truncate(8)"]
binops = ["+", "-", "*", "/", "//", "%", "**", "~", "==", "!=", "<", ">", "<=", ">=", "in", "not in", "and", "or"]
tests = ["defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence", "boolean", "true", "false", "odd", "even", "lower", "upper", "divisibleby 2", "eq 1", "in [1, 'a']"]
methods = ["upper()", "lower()", "strip()", "split()", "split('l')", "startswith('H')", "endswith('d')", "title()", "replace('o', '0')", "count('l')", "find('o')", "items()|list", "keys()|list", "values()|list", "get('a')", "get('zz', 9)"]
def expr(depth=0):
    r = random.random()
    if depth > 2 or r < 0.3: return random.choice(atoms)
    if r < 0.5: return f"({expr(depth+1)} {random.choice(binops)} {expr(depth+1)})"
    if r < 0.65: return f"({expr(depth+1)} | {random.choice(filters)})"
    if r < 0.75: return f"({expr(depth+1)} is {random.choice(['', 'not '])}{random.choice(tests)})"
    if r < 0.82: return random.choice(['s', 'u', 'w', 'd', "'a,b'"]) + '.' + random.choice(methods)
    if r < 0.88: return f"{random.choice(['s', 'l', 'ls', 'u', 'msgs'])}[{random.choice(['0', '-1', '1:', ':-1', '::-1', '5', '1:2', '::2'])}]"
    if r < 0.94: return f"({expr(depth+1)} if {expr(depth+1)} else {expr(depth+1)})"
    return f"(not {expr(depth+1)})"

texts = ["", " ", "  ", "\n", " \n", "\n  ", "a", " a ", "\n\n", "\t", "x\n ", "  \n  \n"]
def tag(body, kind='%'):
    l = random.choice(['', '', '-', '+'] if kind != '{' else ['', '-'])
    r = random.choice(['', '', '-', '+'] if kind != '{' else ['', '-'])
    if kind == '{': return '{{' + l + ' ' + body + ' ' + r + '}}'
    if kind == '#': return '{#' + l + ' ' + body + ' ' + r + '#}'
    return '{%' + l + ' ' + body + ' ' + r + '%}'
def seq(depth=0):
    out = []
    for _ in range(random.randint(1, 4)):
        out.append(random.choice(texts))
        r = random.random()
        if r < 0.25: out.append(tag('x', '{'))
        elif r < 0.35: out.append(tag('c', '#'))
        elif r < 0.5: out.append(tag('set y = 1'))
        elif r < 0.7 and depth < 2: out += [tag('if true'), seq(depth+1), tag('else') if random.random() < 0.3 else '', seq(depth+1), tag('endif')]
        elif r < 0.85 and depth < 2: out += [tag('for i in [1, 2]'), seq(depth+1), tag('endfor')]
        elif depth < 2: out += [tag('raw'), random.choice(texts), '{{ z }}', random.choice(texts), tag('endraw')]
        out.append(random.choice(texts))
    return ''.join(out)

random.seed(101)
for _ in range(400):
    add("{{ " + expr() + " }}", FC, "FC")
random.seed(202)
for _ in range(250):
    add(seq(), {"x": "X"}, "X")
# random nestings of set / for / if / macro / call / block set (scoping)
names = ['a', 'b', 'ns.v', 'loop.index', 'i', 'j', 'm']
def sval():
    return random.choice(['1', 'a', 'b', 'i', "'s'", 'ns.v', 'a + 1', "(b ~ 'x')", 'loop.index', 'loop.last', 'mac(1)', 'caller()' if random.random() < 0.1 else '2', 'loop.previtem', 'j'])
def sblock(depth=0):
    out = []
    for _ in range(random.randint(1, 4)):
        r = random.random()
        if r < 0.25: out.append('{{ ' + sval() + ' }},')
        elif r < 0.45: out.append('{% set ' + random.choice(['a', 'b', 'ns.v', 'j']) + ' = ' + sval() + ' %}')
        elif r < 0.6 and depth < 3: out.append('{% for ' + random.choice(['i', 'j', 'a']) + ' in ' + random.choice(['[1, 2]', 'range(3)', '[]', 'l']) + (' if i is defined' if random.random() < 0.2 else '') + ' %}' + sblock(depth+1) + ('{% else %}E' if random.random() < 0.2 else '') + '{% endfor %}')
        elif r < 0.75 and depth < 3: out.append('{% if ' + sval() + ' %}' + sblock(depth+1) + '{% else %}' + sblock(depth+1) + '{% endif %}')
        elif r < 0.85 and depth < 2: out.append('{% macro mac(a, b=2) %}[' + sblock(depth+1) + ']{% endmacro %}')
        elif r < 0.92 and depth < 2: out.append('{% call mac(5) %}C' + sblock(depth+1) + '{% endcall %}')
        elif depth < 3: out.append('{% set x %}' + sblock(depth+1) + '{% endset %}{{ x }}')
    return ''.join(out)

random.seed(303)
for _ in range(250):
    add("{% set ns = namespace(v=0) %}{% macro mac(a) %}<{{ a }}>{% endmacro %}" + sblock(), {"l": [7, 8]}, "S")
for i, c in enumerate(T):
    c["id"] = "c%03d" % i
with open(__file__.replace("make_jinja_cases.py", "jinja_cases.json"), "w") as f:
    json.dump({"contexts": CONTEXTS, "cases": T}, f, indent=0, ensure_ascii=False)
print(len(T), "cases")
