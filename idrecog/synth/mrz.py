"""ICAO 9303 machine-readable zones: check digits, TD3 (passport, 2 x 44) and TD1 (card, 3 x 30) lines."""

from __future__ import annotations

import re

_WEIGHTS = (7, 3, 1)
_ALLOWED = re.compile(r"^[0-9A-Z<]*$")


def char_value(c: str) -> int:
    """ICAO 9303 character value: digits 0-9, A-Z 10-35, filler '<' 0."""
    if c.isdigit():
        return int(c)
    if "A" <= c <= "Z":
        return ord(c) - ord("A") + 10
    if c == "<":
        return 0
    raise ValueError(f"character {c!r} is not allowed in an MRZ")


def check_digit(data: str) -> str:
    """The 7-3-1 weighted check digit of ``data`` (ICAO 9303 part 3, 4.9).

    >>> check_digit("L898902C3")
    '6'
    """
    return str(sum(char_value(c) * _WEIGHTS[i % 3] for i, c in enumerate(data)) % 10)


def mrz_field(text: str, length: int) -> str:
    """Upper-case, non-MRZ characters to '<', padded / cut to ``length``."""
    text = re.sub(r"[^0-9A-Z<]", "<", text.upper().replace(" ", "<").replace("-", "<"))
    return (text + "<" * length)[:length]


def mrz_name(surname: str, given: str, length: int) -> str:
    return mrz_field(f"{surname}<<{given}", length)


def td3_lines(
    *,
    issuer: str,
    surname: str,
    given: str,
    number: str,
    nationality: str,
    birth: str,
    sex: str,
    expiry: str,
    personal: str = "",
) -> tuple[str, str]:
    """The two 44-character lines of a passport data page. Dates are YYMMDD."""
    line1 = mrz_field("P<" + mrz_field(issuer, 3) + mrz_name(surname, given, 39), 44)
    num = mrz_field(number, 9)
    pers = mrz_field(personal, 14)
    pers_cd = "<" if pers == "<" * 14 else check_digit(pers)
    part = num + check_digit(num) + mrz_field(nationality, 3) + birth + check_digit(birth) + sex[:1]
    part += expiry + check_digit(expiry) + pers + pers_cd
    composite = check_digit(part[0:10] + part[13:20] + part[21:43])
    return line1, part + composite


def td1_lines(
    *,
    doc_code: str,
    issuer: str,
    surname: str,
    given: str,
    number: str,
    nationality: str,
    birth: str,
    sex: str,
    expiry: str,
    optional: str = "",
) -> tuple[str, str, str]:
    """The three 30-character lines of an ID-1 card (TD1). Dates are YYMMDD."""
    num = mrz_field(number, 9)
    line1 = mrz_field(doc_code, 2) + mrz_field(issuer, 3) + num + check_digit(num) + mrz_field(optional, 15)
    line2 = birth + check_digit(birth) + sex[:1] + expiry + check_digit(expiry) + mrz_field(nationality, 3)
    line2 += "<" * 11
    composite = check_digit(line1[5:30] + line2[0:7] + line2[8:15] + line2[18:29])
    return line1, line2 + composite, mrz_name(surname, given, 30)


def validate_td3(line1: str, line2: str) -> bool:
    """True when both lines are well formed and every check digit is right."""
    if len(line1) != 44 or len(line2) != 44 or not (_ALLOWED.match(line1) and _ALLOWED.match(line2)):
        return False
    checks = [(line2[0:9], line2[9]), (line2[13:19], line2[19]), (line2[21:27], line2[27])]
    checks.append((line2[0:10] + line2[13:20] + line2[21:43], line2[43]))
    pers_ok = line2[42] == check_digit(line2[28:42]) or (line2[28:43] == "<" * 15)
    return pers_ok and all(check_digit(d) == c for d, c in checks)


def validate_td1(line1: str, line2: str, line3: str) -> bool:
    if any(len(x) != 30 or not _ALLOWED.match(x) for x in (line1, line2, line3)):
        return False
    checks = [(line1[5:14], line1[14]), (line2[0:6], line2[6]), (line2[8:14], line2[14])]
    checks.append((line1[5:30] + line2[0:7] + line2[8:15] + line2[18:29], line2[29]))
    return all(check_digit(d) == c for d, c in checks)
