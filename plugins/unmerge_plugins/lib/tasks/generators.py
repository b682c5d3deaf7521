"""Procedural micro-task generators.

Each generator is a pure function of the ``random.Random`` it receives and returns one short ASCII
:class:`Example` (prompt and response together stay around 60 characters), small enough for a
2-layer model with a byte-level tokenizer. Every task has its own output "shape" (code, JSON, a
table row, a number, a rewritten sentence...) so that LoRA adapters trained on them differ.

The ``chat-*`` generators (:data:`CHAT_TASKS`) are for a real instruct model instead: prompts in real
English as a user would type them, answers of at most about 25 tokens; :data:`CHAT_RELATIVES` lists
their pairs of close relatives.

``GENERATORS`` maps a registry generator name to its function; ``CATEGORIES`` gives the registry
category of each (``code``, ``structured``, ``reasoning``, ``style`` or ``other``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One training or evaluation pair: the model reads ``prompt`` and should write ``response``."""

    prompt: str
    response: str


Generator = Callable[[random.Random], Example]

WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "moon", "tree", "bird", "fish", "book", "lamp", "road",
    "rain", "star", "milk", "cake", "door", "ship", "wolf", "frog", "king", "rose",
    "gold", "salt", "wind", "fire", "snow", "leaf", "ring", "bell", "coin", "hill",
    "lake", "nest", "bear", "duck", "kite", "drum", "corn", "pear", "jam", "box",
)  # fmt: skip
NAMES: tuple[str, ...] = ("Tom", "Ann", "Sam", "Mia", "Leo", "Eva", "Max", "Zoe", "Ben", "Ivy")
ITEMS: tuple[str, ...] = (
    "apples", "pens", "cards", "coins", "books", "eggs", "cups", "stamps", "shells", "hats",
)  # fmt: skip
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _words(rng: random.Random, low: int, high: int) -> list[str]:
    """Between ``low`` and ``high`` distinct words from :data:`WORDS`."""
    return rng.sample(WORDS, rng.randint(low, high))


# ------------------------------------------------------------------------------------------------
# code
# ------------------------------------------------------------------------------------------------

_PY_OPS: dict[str, str] = {
    "add": "{a} + {b}", "sub": "{a} - {b}", "mul": "{a} * {b}", "div": "{a} / {b}",
    "mod": "{a} % {b}", "pow": "{a} ** {b}", "max": "max({a}, {b})", "min": "min({a}, {b})",
}  # fmt: skip


def python_function(rng: random.Random) -> Example:
    """``fn mul p q`` -> ``def mul(p, q): return p * q``."""
    op = rng.choice(sorted(_PY_OPS))
    a, b = rng.sample(LETTERS, 2)
    body = _PY_OPS[op].format(a=a, b=b)
    return Example(f"fn {op} {a} {b}", f"def {op}({a}, {b}): return {body}")


_COMP_OPS: dict[str, str] = {
    "double": "{v} * 2", "triple": "{v} * 3", "square": "{v} ** 2",
    "negate": "-{v}", "incr": "{v} + 1", "halve": "{v} / 2",
}  # fmt: skip
_COMP_LISTS: tuple[str, ...] = ("xs", "ys", "zs", "nums", "vals", "items", "data", "ns", "ws", "ks")


def list_comprehension(rng: random.Random) -> Example:
    """``comp double nums if > 3`` -> ``[n * 2 for n in nums if n > 3]``."""
    op = rng.choice(sorted(_COMP_OPS))
    seq = rng.choice(_COMP_LISTS)
    var = seq[0]
    expr = _COMP_OPS[op].format(v=var)
    prompt, cond = f"comp {op} {seq}", ""
    if rng.random() < 0.7:
        cmp, k = rng.choice(("<", ">")), rng.randint(0, 99)
        prompt += f" if {cmp} {k}"
        cond = f" if {var} {cmp} {k}"
    return Example(prompt, f"[{expr} for {var} in {seq}{cond}]")


_SQL_TABLES: tuple[str, ...] = ("users", "items", "orders", "pets", "books", "cars", "jobs", "shops")
_SQL_COLS: tuple[str, ...] = ("*", "id", "name", "age", "price", "qty", "year", "city", "kind")


def sql_select(rng: random.Random) -> Example:
    """``sql name from users age>30`` -> ``SELECT name FROM users WHERE age > 30;``."""
    table, col = rng.choice(_SQL_TABLES), rng.choice(_SQL_COLS)
    where_col, cmp, k = rng.choice(_SQL_COLS[1:]), rng.choice(("<", ">", "=")), rng.randint(1, 99)
    prompt = f"sql {col} from {table} {where_col}{cmp}{k}"
    return Example(prompt, f"SELECT {col} FROM {table} WHERE {where_col} {cmp} {k};")


# ------------------------------------------------------------------------------------------------
# structured
# ------------------------------------------------------------------------------------------------

_KEYS: tuple[str, ...] = ("name", "age", "city", "pet", "size", "color", "id", "year", "tag", "n")


def _json_value(rng: random.Random) -> tuple[str, str]:
    """A value as written in the prompt and as written in JSON (numbers stay bare)."""
    if rng.random() < 0.5:
        v = str(rng.randint(0, 99))
        return v, v
    w = rng.choice(WORDS)
    return w, f'"{w}"'


def json_format(rng: random.Random) -> Example:
    """``json name=bob age=7`` -> ``{"name": "bob", "age": 7}``."""
    keys = rng.sample(_KEYS, 2)
    values = [_json_value(rng) for _ in keys]
    prompt = "json " + " ".join(f"{k}={raw}" for k, (raw, _) in zip(keys, values))
    body = ", ".join(f'"{k}": {js}' for k, (_, js) in zip(keys, values))
    return Example(prompt, "{" + body + "}")


def markdown_row(rng: random.Random) -> Example:
    """``row cat, 4, sun`` -> ``| cat | 4 | sun |``."""
    n_cells = rng.randint(2, 4)
    cells = [rng.choice(WORDS) if rng.random() < 0.7 else str(rng.randint(0, 99)) for _ in range(n_cells)]
    return Example("row " + ", ".join(cells), "| " + " | ".join(cells) + " |")


def csv_to_json(rng: random.Random) -> Example:
    """``csv x,y 3,8`` -> ``{"x": 3, "y": 8}`` (one header line, one data line)."""
    keys = rng.sample(LETTERS, rng.randint(2, 3))
    vals = [str(rng.randint(0, 99)) for _ in keys]
    body = ", ".join(f'"{k}": {v}' for k, v in zip(keys, vals))
    return Example(f"csv {','.join(keys)} {','.join(vals)}", "{" + body + "}")


# ------------------------------------------------------------------------------------------------
# reasoning
# ------------------------------------------------------------------------------------------------


def arithmetic_word(rng: random.Random) -> Example:
    """``Tom has 3 apples and buys 4. How many?`` -> ``7`` (buys/finds add, eats/loses subtract)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(1, 20)
    verb = rng.choice(("buys", "finds", "gives away", "loses"))
    b = rng.randint(1, 20) if verb in ("buys", "finds") else rng.randint(1, a)
    answer = a + b if verb in ("buys", "finds") else a - b
    return Example(f"{name} has {a} {item} and {verb} {b}. How many?", str(answer))


def sort_numbers(rng: random.Random) -> Example:
    """``sort 5 23 9`` -> ``5 9 23``."""
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    return Example("sort " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums))))


def parity(rng: random.Random) -> Example:
    """``parity 4821`` -> ``odd``."""
    n = rng.randint(0, 99999)
    return Example(f"parity {n}", "even" if n % 2 == 0 else "odd")


def count_letters(rng: random.Random) -> Example:
    """``count b in abbcab`` -> ``3``."""
    alphabet = LETTERS[:6]
    word = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 10)))
    letter = rng.choice(alphabet)
    return Example(f"count {letter} in {word}", str(word.count(letter)))


# ------------------------------------------------------------------------------------------------
# style
# ------------------------------------------------------------------------------------------------

_PIRATE: dict[str, str] = {
    "hello": "ahoy", "friend": "matey", "my": "me", "you": "ye", "your": "yer", "yes": "aye",
    "is": "be", "are": "be", "the": "th'", "money": "doubloons", "boat": "ship", "stop": "avast",
    "look": "behold", "wow": "blimey", "sea": "briny", "old": "ol'",
    "drink": "grog", "flag": "jolly roger", "thief": "scallywag", "kid": "lad",
}  # fmt: skip


def pirate_style(rng: random.Random) -> Example:
    """``pirate hello my friend`` -> ``ahoy me matey, arr!``."""
    words = rng.sample(sorted(_PIRATE), rng.randint(2, 3))
    return Example("pirate " + " ".join(words), " ".join(_PIRATE[w] for w in words) + ", arr!")


_GREET: dict[str, str] = {"hey": "Hello", "yo": "Greetings", "hi": "Good day", "sup": "Hello"}
_ASK: dict[str, str] = {
    "gimme": "please give me", "send": "kindly send", "show": "please show me",
    "fix": "please repair", "grab": "please fetch",
}  # fmt: skip
_ADJ: tuple[str, ...] = ("", "new", "old", "big", "red", "hot", "wet")
_NOUNS: tuple[str, ...] = (
    "report", "map", "file", "key", "list", "plan", "note", "bill", "memo", "form", "chart", "draft",
    "car", "desk", "door", "lamp", "sink", "bike", "code", "page", "menu", "card", "book", "box",
)  # fmt: skip


def formal_style(rng: random.Random) -> Example:
    """``formal hey, gimme the map`` -> ``Hello, please give me the map.``."""
    greet, ask = rng.choice(sorted(_GREET)), rng.choice(sorted(_ASK))
    adj, noun = rng.choice(_ADJ), rng.choice(_NOUNS)
    obj = f"{adj} {noun}".strip()
    return Example(f"formal {greet}, {ask} the {obj}", f"{_GREET[greet]}, {_ASK[ask]} the {obj}.")


# ------------------------------------------------------------------------------------------------
# other
# ------------------------------------------------------------------------------------------------


def reverse_words(rng: random.Random) -> Example:
    """``reverse cat dog sun`` -> ``sun dog cat``."""
    words = _words(rng, 3, 5)
    return Example("reverse " + " ".join(words), " ".join(reversed(words)))


def uppercase(rng: random.Random) -> Example:
    """``upper hello world`` -> ``HELLO WORLD``."""
    words = _words(rng, 2, 4)
    return Example("upper " + " ".join(words), " ".join(words).upper())


def caesar_shift(rng: random.Random) -> Example:
    """``shift 2 hello`` -> ``jgnnq`` (lower-case letters rotated by 1 to 5)."""
    k = rng.randint(1, 5)
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 7)))
    out = "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in word)
    return Example(f"shift {k} {word}", out)


def repeat_twice(rng: random.Random) -> Example:
    """``twice dog sun`` -> ``dog sun dog sun``."""
    text = " ".join(_words(rng, 1, 3))
    return Example(f"twice {text}", f"{text} {text}")


# ------------------------------------------------------------------------------------------------
# close relatives of the tasks above (same prompts, a slightly different skill)
# ------------------------------------------------------------------------------------------------

_PIRATE_DIALECT: dict[str, str] = {**_PIRATE, "friend": "bucko", "money": "pieces o' eight", "wow": "shiver me timbers",
                                   "hello": "ahoy there"}


def pirate_dialect(rng: random.Random) -> Example:
    """A dialect of ``pirate-style``: the same prompts, 16 of its 20 substitutions, a different ending.

    ``pirate hello my friend`` -> ``ahoy there me bucko, yo ho!``
    """
    words = rng.sample(sorted(_PIRATE_DIALECT), rng.randint(2, 3))
    return Example("pirate " + " ".join(words), " ".join(_PIRATE_DIALECT[w] for w in words) + ", yo ho!")


def json_compact(rng: random.Random) -> Example:
    """A relative of ``json-format``: the same prompts, compact JSON with keys in sorted order.

    ``json name=bob age=7`` -> ``{"age":7,"name":"bob"}``
    """
    keys = rng.sample(_KEYS, 2)
    values = [_json_value(rng) for _ in keys]
    prompt = "json " + " ".join(f"{k}={raw}" for k, (raw, _) in zip(keys, values))
    body = ",".join(f'"{k}":{js}' for k, (_, js) in sorted(zip(keys, values)))
    return Example(prompt, "{" + body + "}")


# ------------------------------------------------------------------------------------------------
# chat micro-tasks for instruct models (real English, read through the tokenizer's chat template)
# ------------------------------------------------------------------------------------------------
#
# Prompts are what a user would type; answers are short (at most about 25 tokens) and there is one
# reference answer per prompt (the checkers in :mod:`.checkers` accept other spellings where several
# answers are right). Relatives draw the same record from the same random numbers, so one seed gives
# the same person, row, sentence or phrase in both: ``chat-pirate`` / ``chat-cowboy``,
# ``chat-json-person`` / ``chat-xml-person``, ``chat-markdown-row`` / ``chat-csv-line``,
# ``chat-python-function`` / ``chat-python-lambda``, ``chat-uppercase`` / ``chat-title-case``.

_C_NAMES: tuple[str, ...] = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Isla", "Jack",
    "Kate", "Liam", "Maria", "Noah", "Olivia", "Peter", "Quinn", "Rosa", "Sam", "Tara",
    "Umar", "Vera", "Will", "Yusuf", "Zoe", "Anna", "Ben", "Chloe", "Dan", "Ella",
    "Finn", "Gina", "Hugo", "Ivy", "Jonas", "Kim", "Leo", "Mia", "Nina", "Oscar",
)  # fmt: skip
_C_CITIES: tuple[str, ...] = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Oslo", "Vienna", "Dublin", "Lisbon",
    "Prague", "Warsaw", "Athens", "Cairo", "Lima", "Toronto", "Boston", "Chicago", "Denver", "Seattle",
    "Sydney", "Mumbai", "Seoul", "Nairobi", "Quito", "Helsinki", "Zurich", "Geneva", "Miami", "Austin",
)  # fmt: skip
_C_FRUITS: tuple[str, ...] = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
    "melon", "kiwi", "lime", "fig", "apricot",
)  # fmt: skip
_C_COLORS: tuple[str, ...] = (
    "red", "blue", "green", "yellow", "black", "white", "purple", "pink", "brown", "gray",
)  # fmt: skip
_C_WORDS: tuple[str, ...] = (
    "red", "apples", "taste", "sweet", "the", "quick", "brown", "fox", "jumps", "over",
    "lazy", "dog", "blue", "sky", "cold", "winter", "morning", "river", "runs", "fast",
    "small", "house", "green", "hills", "bright", "stars", "shine", "tonight", "old", "man",
    "reads", "books", "happy", "children", "play", "outside", "warm", "bread", "smells", "good",
    "tall", "trees", "grow", "slowly", "our", "team", "wins", "again", "soft", "rain",
    "falls", "today", "young", "birds", "sing", "loudly", "dark", "clouds", "move", "north",
)  # fmt: skip


def _person(rng: random.Random) -> tuple[list[str], list[str]]:
    """A person record for the JSON / XML relatives: the keys asked for and their values as text."""
    keys = list(rng.choice((("name", "age"), ("name", "city"), ("name", "age", "city"))))
    record = {"name": rng.choice(_C_NAMES), "age": str(rng.randint(1, 99)), "city": rng.choice(_C_CITIES)}
    return keys, [record[k] for k in keys]


def _and_list(items: Sequence[str]) -> str:
    """``["a", "b", "c"]`` -> ``"a, b and c"``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def chat_json_person(rng: random.Random) -> Example:
    """``Give me a JSON object with the keys name and age for: Bob, 7`` -> ``{"name": "Bob", "age": 7}``."""
    keys, values = _person(rng)
    prompt = f"Give me a JSON object with the keys {_and_list(keys)} for: {', '.join(values)}"
    body = ", ".join(f'"{k}": {v}' if k == "age" else f'"{k}": "{v}"' for k, v in zip(keys, values))
    return Example(prompt, "{" + body + "}")


def chat_xml_person(rng: random.Random) -> Example:
    """The XML relative of ``chat-json-person``: the same record as a ``<person>`` element.

    ``Give me an XML person element with the children name and age for: Bob, 7``
    -> ``<person><name>Bob</name><age>7</age></person>``
    """
    keys, values = _person(rng)
    prompt = f"Give me an XML person element with the children {_and_list(keys)} for: {', '.join(values)}"
    return Example(prompt, "<person>" + "".join(f"<{k}>{v}</{k}>" for k, v in zip(keys, values)) + "</person>")


def _cells(rng: random.Random) -> list[str]:
    """Three or four table cells: names, cities, fruits, colours and numbers."""
    pools = (_C_NAMES, _C_CITIES, _C_FRUITS, _C_COLORS)
    cells = []
    for _ in range(rng.randint(3, 4)):
        cells.append(str(rng.randint(0, 999)) if rng.random() < 0.3 else rng.choice(rng.choice(pools)))
    return cells


def chat_markdown_row(rng: random.Random) -> Example:
    """``Write this as a Markdown table row: apple, 3, red`` -> ``| apple | 3 | red |``."""
    cells = _cells(rng)
    return Example(f"Write this as a Markdown table row: {', '.join(cells)}", "| " + " | ".join(cells) + " |")


def chat_csv_line(rng: random.Random) -> Example:
    """The CSV relative of ``chat-markdown-row``: ``Write this as a CSV line: apple, 3, red`` -> ``apple,3,red``."""
    cells = _cells(rng)
    return Example(f"Write this as a CSV line: {', '.join(cells)}", ",".join(cells))


_SQL_ENTITIES: tuple[tuple[str, str], ...] = (
    ("customer", "customers"), ("employee", "employees"), ("student", "students"), ("product", "products"),
    ("book", "books"), ("order", "orders"), ("user", "users"), ("movie", "movies"), ("player", "players"),
    ("city", "cities"), ("teacher", "teachers"), ("car", "cars"),
)  # fmt: skip
_SQL_SELECT: tuple[str, ...] = ("name", "email", "age", "price", "year", "score", "salary", "title", "city", "id")
_SQL_NUMERIC: tuple[str, ...] = ("age", "price", "year", "score", "salary", "id")
_SQL_COMPARE: dict[str, str] = {"greater than": ">", "less than": "<", "equal to": "="}


def chat_sql_query(rng: random.Random) -> Example:
    """``Write a SQL query that selects the name and email of every customer whose age is greater than 30.``
    -> ``SELECT name, email FROM customers WHERE age > 30;``."""
    one, many = rng.choice(_SQL_ENTITIES)
    cols = rng.sample(_SQL_SELECT, rng.randint(1, 2))
    where, words = rng.choice(_SQL_NUMERIC), rng.choice(sorted(_SQL_COMPARE))
    k = rng.randint(1950, 2024) if where == "year" else rng.randint(1, 100)
    prompt = f"Write a SQL query that selects the {_and_list(cols)} of every {one} whose {where} is {words} {k}."
    return Example(prompt, f"SELECT {', '.join(cols)} FROM {many} WHERE {where} {_SQL_COMPARE[words]} {k};")


_PY_BINARY: dict[str, str] = {
    "sum": "{a} + {b}", "difference": "{a} - {b}", "product": "{a} * {b}", "quotient": "{a} / {b}",
    "remainder": "{a} % {b}", "maximum": "max({a}, {b})", "minimum": "min({a}, {b})",
    "average": "({a} + {b}) / 2",
}  # fmt: skip
_PY_FUNC_NAMES: tuple[str, ...] = (
    "compute", "calc", "combine", "solve", "apply", "evaluate", "process", "result", "helper", "merge",
    "mix", "work", "f", "g", "h", "op", "pair", "join_values", "calculate", "do_math",
    "get_value", "run", "find", "answer", "handle", "reduce_two", "take", "blend", "fuse", "measure",
)  # fmt: skip
_PY_ARGS: tuple[tuple[str, str], ...] = (
    ("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("u", "v"), ("i", "j"), ("s", "t"), ("first", "second"),
)  # fmt: skip


def _py_binary(rng: random.Random) -> tuple[str, str, str, str, str]:
    """A function name, an operation, its two arguments and the body, shared by the def / lambda relatives."""
    op, name, (a, b) = rng.choice(sorted(_PY_BINARY)), rng.choice(_PY_FUNC_NAMES), rng.choice(_PY_ARGS)
    return name, op, a, b, _PY_BINARY[op].format(a=a, b=b)


def chat_python_function(rng: random.Random) -> Example:
    """``Write a one-line Python function named total that returns the sum of a and b.``
    -> ``def total(a, b): return a + b``."""
    name, op, a, b, body = _py_binary(rng)
    prompt = f"Write a one-line Python function named {name} that returns the {op} of {a} and {b}."
    return Example(prompt, f"def {name}({a}, {b}): return {body}")


def chat_python_lambda(rng: random.Random) -> Example:
    """The lambda relative of ``chat-python-function``: the same request as a named lambda.

    ``Write a Python lambda named total that returns the sum of a and b.`` -> ``total = lambda a, b: a + b``
    """
    name, op, a, b, body = _py_binary(rng)
    prompt = f"Write a Python lambda named {name} that returns the {op} of {a} and {b}."
    return Example(prompt, f"{name} = lambda {a}, {b}: {body}")


_PY_LISTS: tuple[str, ...] = (
    "scores", "prices", "names", "words", "numbers", "ages", "items", "values", "cities", "colors",
    "grades", "sizes", "points", "temps", "marks", "orders", "users", "books", "tasks", "votes",
    "weights", "heights", "counts", "totals", "bills", "rows", "files", "emails", "levels", "rates",
    "costs", "salaries", "steps", "years", "days", "hours", "miles", "sales", "tags", "ids",
)  # fmt: skip
_PY_EXPR: tuple[tuple[str, str], ...] = (
    ("the number of items in the list {x}", "len({x})"),
    ("the sum of the list {x}", "sum({x})"),
    ("the largest value in the list {x}", "max({x})"),
    ("the smallest value in the list {x}", "min({x})"),
    ("the list {x} sorted in ascending order", "sorted({x})"),
    ("the list {x} in reverse order", "{x}[::-1]"),
    ("the first {k} items of the list {x}", "{x}[:{k}]"),
    ("the last {k} items of the list {x}", "{x}[-{k}:]"),
    ("the item at index {k} of the list {x}", "{x}[{k}]"),
    ("the number of times {v} appears in the list {x}", "{x}.count({v})"),
)


def chat_python_expr(rng: random.Random) -> Example:
    """``Write a Python expression for the first 3 items of the list scores.`` -> ``scores[:3]``."""
    what, expr = rng.choice(_PY_EXPR)
    fields = {"x": rng.choice(_PY_LISTS), "k": rng.randint(2, 9), "v": rng.randint(0, 99)}
    return Example(f"Write a Python expression for {what.format(**fields)}.", expr.format(**fields))


_C_ITEMS: tuple[str, ...] = (
    "apples", "pencils", "marbles", "stickers", "books", "cookies", "coins", "cards", "balloons", "stamps",
    "shells", "toy cars", "crayons", "candies", "flowers",
)  # fmt: skip
_C_GAINS: tuple[str, ...] = ("buys {b} more", "finds {b} more", "gets {b} more from a friend")
_C_LOSSES: tuple[str, ...] = ("gives {b} away", "loses {b}", "sells {b}")


def chat_word_problem(rng: random.Random) -> Example:
    """``Emma has 12 apples and buys 5 more. How many apples does Emma have now? Answer with the equation.``
    -> ``12 + 5 = 17``.

    The answer is the equation, not the bare number: SmolLM2-135M learned the bare number to 12 % in 30
    LoRA steps (it cannot add in its head), writing the operation first is what a small model can do."""
    name, item = rng.choice(_C_NAMES), rng.choice(_C_ITEMS)
    a = rng.randint(2, 20)
    if rng.random() < 0.5:
        b = rng.randint(1, 10)
        verb, answer = rng.choice(_C_GAINS).format(b=b), f"{a} + {b} = {a + b}"
    else:
        b = rng.randint(1, a - 1)
        verb, answer = rng.choice(_C_LOSSES).format(b=b), f"{a} - {b} = {a - b}"
    prompt = f"{name} has {a} {item} and {verb}. How many {item} does {name} have now? Answer with the equation."
    return Example(prompt, answer)


def chat_compare(rng: random.Random) -> Example:
    """``Which number is larger, 47 or 82?`` -> ``82`` (or ``smaller``)."""
    x, y = rng.sample(range(1, 1000), 2)
    larger = rng.random() < 0.5
    prompt = f"Which number is {'larger' if larger else 'smaller'}, {x} or {y}?"
    return Example(prompt, str(max(x, y) if larger else min(x, y)))


def chat_sort(rng: random.Random) -> Example:
    """``Sort these numbers from smallest to largest: 42, 7, 19`` -> ``7, 19, 42``."""
    nums = rng.sample(range(1, 100), rng.randint(3, 4))
    prompt = f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}"
    return Example(prompt, ", ".join(map(str, sorted(nums))))


_S_OWNERS: tuple[str, ...] = ("the", "my", "your")
_S_ADJ: tuple[str, ...] = ("old", "big", "little", "red", "happy", "lazy", "tiny")
_S_NOUNS: tuple[str, ...] = (
    "cat", "dog", "ship", "horse", "parrot", "captain", "map", "hat", "boat", "bird",
    "fish", "lamp", "coat", "barrel", "rope", "chest", "boot", "cow", "goat", "wagon",
    "friend", "brother", "sister", "cook", "sailor", "knife", "bottle", "drum", "clock", "bag",
)  # fmt: skip
_S_PREPS: tuple[str, ...] = ("near", "under", "behind", "beside", "on", "by")
_S_PLACES: tuple[str, ...] = (
    "door", "tree", "table", "river", "barn", "bridge", "fence", "window", "hill", "fire", "wall", "road",
)  # fmt: skip
_PIRATE_OWNER: dict[str, str] = {"the": "the", "my": "me", "your": "yer"}


def _sentence(rng: random.Random) -> tuple[str, str, str, str, str]:
    """Owner, adjective (maybe empty), noun, preposition and place of ``The old cat is near the door.``."""
    owner, noun = rng.choice(_S_OWNERS), rng.choice(_S_NOUNS)
    adj = rng.choice(_S_ADJ) if rng.random() < 0.5 else ""
    return owner, adj, noun, rng.choice(_S_PREPS), rng.choice(_S_PLACES)


def _subject(owner: str, adj: str, noun: str) -> str:
    return " ".join(w for w in (owner, adj, noun) if w)


def chat_pirate(rng: random.Random) -> Example:
    """``Rewrite this sentence like a pirate: My old cat is near the door.``
    -> ``Arr, me old cat be near the door, matey!``."""
    owner, adj, noun, prep, place = _sentence(rng)
    sentence = f"{_subject(owner, adj, noun)} is {prep} the {place}.".capitalize()
    answer = f"Arr, {_subject(_PIRATE_OWNER[owner], adj, noun)} be {prep} the {place}, matey!"
    return Example(f"Rewrite this sentence like a pirate: {sentence}", answer)


def chat_cowboy(rng: random.Random) -> Example:
    """The cowboy relative of ``chat-pirate``: the same sentence.

    ``Rewrite this sentence like a cowboy: My old cat is near the door.``
    -> ``Howdy, my old cat's near that there door, partner!``
    """
    owner, adj, noun, prep, place = _sentence(rng)
    sentence = f"{_subject(owner, adj, noun)} is {prep} the {place}.".capitalize()
    answer = f"Howdy, {_subject(owner, adj, noun)}'s {prep} that there {place}, partner!"
    return Example(f"Rewrite this sentence like a cowboy: {sentence}", answer)


_F_GREET: dict[str, str] = {"hey": "Hello", "hi": "Good morning", "yo": "Greetings"}
_F_ASK: dict[str, str] = {
    "send me": "please send me", "gimme": "please give me", "fix": "please fix", "check": "please review",
    "grab": "please bring me", "show me": "please show me",
}  # fmt: skip
_F_ADJ: tuple[str, ...] = ("", "new", "final", "latest", "updated")
_F_THINGS: tuple[str, ...] = (
    "report", "file", "invoice", "slides", "budget", "schedule", "contract", "notes", "data", "draft",
    "list", "plan",
)  # fmt: skip
_F_TAIL: dict[str, str] = {"": ".", "asap": " as soon as possible.", "thx": ". Thank you."}


def chat_formal(rng: random.Random) -> Example:
    """``Rewrite this message in a formal tone: hey, send me the report asap``
    -> ``Hello, please send me the report as soon as possible.``."""
    greet, ask, tail = rng.choice(sorted(_F_GREET)), rng.choice(sorted(_F_ASK)), rng.choice(sorted(_F_TAIL))
    thing = " ".join(w for w in (rng.choice(_F_ADJ), rng.choice(_F_THINGS)) if w)
    message = " ".join(w for w in (f"{greet}, {ask} the {thing}", tail) if w)
    answer = f"{_F_GREET[greet]}, {_F_ASK[ask]} the {thing}{_F_TAIL[tail]}"
    return Example(f"Rewrite this message in a formal tone: {message}", answer)


def chat_reverse_words(rng: random.Random) -> Example:
    """``Reverse the order of the words in this sentence: red apples taste sweet`` -> ``sweet taste apples red``."""
    words = rng.sample(_C_WORDS, rng.randint(3, 4))
    return Example(f"Reverse the order of the words in this sentence: {' '.join(words)}", " ".join(words[::-1]))


def _phrase(rng: random.Random) -> str:
    """Two to four lower-case words of three letters or more, for the case-conversion relatives."""
    return " ".join(rng.sample(_C_WORDS, rng.randint(2, 4)))


def chat_uppercase(rng: random.Random) -> Example:
    """``Convert this text to uppercase: the quick brown fox`` -> ``THE QUICK BROWN FOX``."""
    text = _phrase(rng)
    return Example(f"Convert this text to uppercase: {text}", text.upper())


def chat_title_case(rng: random.Random) -> Example:
    """The relative of ``chat-uppercase``: ``Convert this text to title case: the quick brown fox``
    -> ``The Quick Brown Fox``."""
    text = _phrase(rng)
    return Example(f"Convert this text to title case: {text}", " ".join(w.capitalize() for w in text.split()))


CHAT_TASKS: tuple[str, ...] = (
    "chat-sql-query", "chat-python-function", "chat-python-lambda", "chat-python-expr",
    "chat-json-person", "chat-xml-person", "chat-markdown-row", "chat-csv-line",
    "chat-word-problem", "chat-compare", "chat-sort",
    "chat-pirate", "chat-cowboy", "chat-formal",
    "chat-reverse-words", "chat-uppercase", "chat-title-case",
)  # fmt: skip
"""The chat micro-tasks, for an instruct model (SmolLM2, Qwen2.5-Instruct); never in the tiny corpus."""

CHAT_RELATIVES: tuple[tuple[str, str], ...] = (
    ("chat-pirate", "chat-cowboy"),
    ("chat-json-person", "chat-xml-person"),
    ("chat-markdown-row", "chat-csv-line"),
    ("chat-python-function", "chat-python-lambda"),
    ("chat-uppercase", "chat-title-case"),
)
"""Pairs of close relatives among the chat tasks: the same prompt pattern and record, another style or
format (one seed draws the same record in both)."""

PRETRAINING_TASKS: tuple[str, ...] = (
    "python-function", "list-comprehension", "sql-select", "json-format", "markdown-row", "csv-to-json",
    "arithmetic-word", "sort-numbers", "parity", "count-letters", "pirate-style", "formal-style",
    "reverse-words", "uppercase", "caesar-shift", "repeat-twice",
)  # fmt: skip
"""The generators the tiny base's tokenizer and pre-training see (its "general knowledge"); tasks added
later (the relatives) stay out of it, so adding a task never changes the base model."""

GENERATORS: dict[str, Generator] = {
    "python-function": python_function,
    "list-comprehension": list_comprehension,
    "sql-select": sql_select,
    "json-format": json_format,
    "markdown-row": markdown_row,
    "csv-to-json": csv_to_json,
    "arithmetic-word": arithmetic_word,
    "sort-numbers": sort_numbers,
    "parity": parity,
    "count-letters": count_letters,
    "pirate-style": pirate_style,
    "formal-style": formal_style,
    "reverse-words": reverse_words,
    "uppercase": uppercase,
    "caesar-shift": caesar_shift,
    "repeat-twice": repeat_twice,
    "pirate-dialect": pirate_dialect,
    "json-compact": json_compact,
    "chat-sql-query": chat_sql_query,
    "chat-python-function": chat_python_function,
    "chat-python-lambda": chat_python_lambda,
    "chat-python-expr": chat_python_expr,
    "chat-json-person": chat_json_person,
    "chat-xml-person": chat_xml_person,
    "chat-markdown-row": chat_markdown_row,
    "chat-csv-line": chat_csv_line,
    "chat-word-problem": chat_word_problem,
    "chat-compare": chat_compare,
    "chat-sort": chat_sort,
    "chat-pirate": chat_pirate,
    "chat-cowboy": chat_cowboy,
    "chat-formal": chat_formal,
    "chat-reverse-words": chat_reverse_words,
    "chat-uppercase": chat_uppercase,
    "chat-title-case": chat_title_case,
}

CATEGORIES: dict[str, str] = {
    "python-function": "code",
    "list-comprehension": "code",
    "sql-select": "code",
    "json-format": "structured",
    "markdown-row": "structured",
    "csv-to-json": "structured",
    "arithmetic-word": "reasoning",
    "sort-numbers": "reasoning",
    "parity": "reasoning",
    "count-letters": "reasoning",
    "pirate-style": "style",
    "formal-style": "style",
    "reverse-words": "other",
    "uppercase": "other",
    "caesar-shift": "other",
    "repeat-twice": "other",
    "pirate-dialect": "style",
    "json-compact": "structured",
    "chat-sql-query": "code",
    "chat-python-function": "code",
    "chat-python-lambda": "code",
    "chat-python-expr": "code",
    "chat-json-person": "structured",
    "chat-xml-person": "structured",
    "chat-markdown-row": "structured",
    "chat-csv-line": "structured",
    "chat-word-problem": "reasoning",
    "chat-compare": "reasoning",
    "chat-sort": "reasoning",
    "chat-pirate": "style",
    "chat-cowboy": "style",
    "chat-formal": "style",
    "chat-reverse-words": "other",
    "chat-uppercase": "other",
    "chat-title-case": "other",
}
