"""Generate the math source: `python dsv4/data/make_math.py` writes `corpus/math.jsonl.gz`.

Worked arithmetic and algebra examples, every step computed here, so each one is correct; a fixed
seed makes the file byte-identical on every run. Each document is a short problem set of mixed kinds.
"""

from __future__ import annotations

import math
import random
import sys
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from make_corpus import CORPUS, write_jsonl_gz

SEED = 20240501
NUM_DOCS = 1200
PROBLEMS_PER_DOC = (4, 10)


def signed(n: int) -> str:
    """The term `+ n` written as a binary operator: `+ 5`, `- 5`."""
    return f"+ {n}" if n >= 0 else f"- {-n}"


def term(c: int, var: str) -> str:
    """`c·var` as written by hand: `3x`, `x`, `-x`."""
    return {1: var, -1: f"-{var}"}.get(c, f"{c}{var}")


def par(n) -> str:
    """A negative operand in parentheses, so `3 × (-4)` never reads as `3 × -4`."""
    return f"({n})" if n < 0 else str(n)


def poly(coeffs: list[int], var: str = "x") -> str:
    """coeffs[i] is the coefficient of var**i; printed highest power first."""
    terms = []
    for i in reversed(range(len(coeffs))):
        c = coeffs[i]
        if c == 0:
            continue
        mag = "" if abs(c) == 1 and i > 0 else str(abs(c))
        body = mag + (var if i == 1 else f"{var}^{i}" if i > 1 else "")
        sign = "-" if c < 0 else "+"
        terms.append(("-" if sign == "-" else "") + body if not terms else f" {sign} {body}")
    return "".join(terms) or "0"


def addition(r: random.Random) -> str:
    a, b = r.randint(100, 99999), r.randint(100, 99999)
    if r.random() < 0.5:
        return f"Compute {a} + {b}.\nAdding column by column from the right gives {a} + {b} = {a + b}.\nAnswer: {a + b}"
    a, b = max(a, b), min(a, b)
    return (f"Compute {a} - {b}.\nSubtracting column by column from the right gives {a} - {b} = {a - b}.\n"
            f"Answer: {a - b}")


def multiplication(r: random.Random) -> str:
    a, b = r.randint(12, 99), r.randint(101, 999)
    digits = [(int(d) * 10 ** i) for i, d in enumerate(reversed(str(b))) if d != "0"][::-1]
    parts = " + ".join(f"{a} × {d}" for d in digits)
    vals = " + ".join(str(a * d) for d in digits)
    return f"Compute {a} × {b}.\nSplit {b} by place value: {a} × {b} = {parts} = {vals} = {a * b}.\nAnswer: {a * b}"


def division(r: random.Random) -> str:
    d = r.randint(3, 97)
    n = r.randint(d * 10, 99999)
    q, m = divmod(n, d)
    return (f"Divide {n} by {d}, giving quotient and remainder.\n{d} × {q} = {d * q}, and {n} - {d * q} = {m}, "
            f"which is less than {d}.\nSo {n} = {d} × {q} + {m}.\nAnswer: quotient {q}, remainder {m}")


def gcd_euclid(r: random.Random) -> str:
    g = r.randint(2, 40)
    a, b = g * r.randint(5, 120), g * r.randint(5, 120)
    a, b = max(a, b), min(a, b)
    lines, x, y = [], a, b
    while y:
        lines.append(f"{x} = {x // y} × {y} + {x % y}")
        x, y = y, x % y
    return (f"Find gcd({a}, {b}) with Euclid's algorithm.\n" + "\n".join(lines)
            + f"\nThe last nonzero remainder is {x}.\nAnswer: {x}")


def fractions(r: random.Random) -> str:
    (an, ad), (bn, bd) = [(r.randint(1, 12), r.randint(2, 15)) for _ in range(2)]
    a, b = f"{an}/{ad}", f"{bn}/{bd}"
    op = r.choice("+-×")
    if op == "×":
        res = Fraction(an * bn, ad * bd)
        how = f"Multiply numerators and denominators: {a} × {b} = {an * bn}/{ad * bd}"
    else:
        l = math.lcm(ad, bd)
        na, nb = an * (l // ad), bn * (l // bd)
        res = Fraction(na + nb if op == "+" else na - nb, l)
        how = (f"The common denominator is lcm({ad}, {bd}) = {l}, so "
               f"{a} {op} {b} = {na}/{l} {op} {nb}/{l} = {na + nb if op == '+' else na - nb}/{l}")
    return f"Compute {a} {op} {b} and simplify.\n{how}, which simplifies to {res}.\nAnswer: {res}"


def linear_equation(r: random.Random) -> str:
    x = r.randint(-30, 30)
    a = r.choice([n for n in range(-12, 13) if n not in (0, 1)])
    b = r.randint(-50, 50)
    c = a * x + b
    move = f"Subtract {b} from both sides" if b >= 0 else f"Add {-b} to both sides"
    return (f"Solve {term(a, 'x')} {signed(b)} = {c}.\n{move}: {term(a, 'x')} = {c - b}.\n"
            f"Divide both sides by {a}: x = {x}.\nCheck: {a} × {par(x)} {signed(b)} = {c}.\nAnswer: x = {x}")


def linear_system(r: random.Random) -> str:
    x, y = r.randint(-15, 15), r.randint(-15, 15)
    while True:
        a, b, c, d = (r.randint(-9, 9) for _ in range(4))
        if a and b and c and d and a * d - b * c:
            break
    e, f = a * x + b * y, c * x + d * y
    det = a * d - b * c
    eqs = [f"{term(p, 'x')} {signed(q)[0]} {term(abs(q), 'y')} = {v}" for p, q, v in [(a, b, e), (c, d, f)]]
    return (f"Solve the system {eqs[0]} and {eqs[1]}.\n"
            f"Multiply the first equation by {d} and the second by {b}, then subtract: "
            f"({a * d} - {par(b * c)})x = {e * d} - {par(f * b)}, so {term(det, 'x')} = {e * d - f * b} and x = {x}.\n"
            f"Substitute into the first equation: "
            f"{term(b, 'y')} = {e} - {par(a)} × {par(x)} = {e - a * x}, so y = {y}.\n"
            f"Answer: x = {x}, y = {y}")


def quadratic(r: random.Random) -> str:
    p, q = r.randint(-12, 12), r.randint(-12, 12)
    s, t = -(p + q), p * q  # (x - p)(x - q) = x^2 + s x + t
    eq = poly([t, s, 1])
    roots = sorted({p, q})
    ans = f"x = {roots[0]}" if len(roots) == 1 else f"x = {roots[0]} or x = {roots[1]}"
    return (f"Solve {eq} = 0.\nFind two numbers whose sum is {-s} and whose product is {t}: {p} and {q}.\n"
            f"So {eq} = (x {signed(-p)})(x {signed(-q)}) = 0.\nAnswer: {ans}")


def derivative(r: random.Random) -> str:
    deg = r.randint(2, 5)
    coeffs = [r.randint(-9, 9) for _ in range(deg)] + [r.choice([n for n in range(-9, 10) if n])]
    d = [i * c for i, c in enumerate(coeffs)][1:]
    steps = ", ".join(f"d/dx({poly([0] * i + [c])}) = {poly([0] * (i - 1) + [i * c])}"
                      for i, c in reversed(list(enumerate(coeffs))) if i > 0 and c)
    return (f"Differentiate f(x) = {poly(coeffs)}.\nBy the power rule, d/dx(x^n) = n x^(n-1): {steps}.\n"
            f"Answer: f'(x) = {poly(d)}")


def factorise(r: random.Random) -> str:
    n = math.prod(r.choice([2, 2, 2, 3, 3, 5, 7, 11, 13, 17, 19, 23]) for _ in range(r.randint(2, 6)))
    lines, m, p, fs = [], n, 2, []
    while m > 1:
        if m % p == 0:
            lines.append(f"{m} = {p} × {m // p}" if m != p else f"{m} is prime")
            fs.append(p)
            m //= p
        else:
            p += 1
    pretty = " × ".join(f"{p}^{fs.count(p)}" if fs.count(p) > 1 else str(p) for p in sorted(set(fs)))
    return f"Find the prime factorisation of {n}.\n" + "\n".join(lines) + f"\nAnswer: {n} = {pretty}"


def percentage(r: random.Random) -> str:
    pct, base = r.choice([5, 10, 12, 15, 20, 25, 30, 40, 50, 75]), r.randint(2, 400) * 4
    val = Fraction(pct * base, 100)
    return (f"What is {pct}% of {base}?\n{pct}% of {base} = {pct}/100 × {base} = {pct * base}/100 = {val}.\n"
            f"Answer: {val}")


def arithmetic_series(r: random.Random) -> str:
    a, d, n = r.randint(-20, 20), r.randint(1, 9), r.randint(5, 60)
    last = a + (n - 1) * d
    return (f"Find the sum of the first {n} terms of the arithmetic sequence {a}, {a + d}, {a + 2 * d}, ...\n"
            f"The {n}th term is {a} + ({n} - 1) × {d} = {last}.\n"
            f"The sum is {n} × ({a} + {par(last)}) / 2 = {n * (a + last) // 2}.\nAnswer: {n * (a + last) // 2}")


def modular_power(r: random.Random) -> str:
    b, e, m = r.randint(2, 20), r.randint(5, 40), r.randint(7, 97)
    lines, acc, base, k = [], 1, b % m, e
    while k:
        if k & 1:
            lines.append(f"bit 1: result = {acc} × {base} mod {m} = {acc * base % m}")
            acc = acc * base % m
        else:
            lines.append("bit 0: result unchanged")
        k >>= 1
        if k:
            lines.append(f"square: {base}^2 mod {m} = {base * base % m}")
            base = base * base % m
    return (f"Compute {b}^{e} mod {m} by repeated squaring ({e} in binary is {e:b}, read from the right).\n"
            + "\n".join(lines) + f"\nAnswer: {pow(b, e, m)}")


KINDS = [addition, multiplication, division, gcd_euclid, fractions, linear_equation, linear_system,
         quadratic, derivative, factorise, percentage, arithmetic_series, modular_power]


def make_docs(seed: int = SEED, num_docs: int = NUM_DOCS) -> list[dict]:
    r = random.Random(seed)
    docs = []
    for i in range(num_docs):
        problems = [r.choice(KINDS)(r) for _ in range(r.randint(*PROBLEMS_PER_DOC))]
        text = "\n\n".join(f"Problem {k + 1}. {p}" for k, p in enumerate(problems))
        docs.append({"title": f"Worked examples {i + 1}", "text": text})
    return docs


if __name__ == "__main__":
    CORPUS.mkdir(exist_ok=True)
    write_jsonl_gz(CORPUS / "math.jsonl.gz", make_docs())
