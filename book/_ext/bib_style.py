"""One citation style for the text and the reference list: author and year.

The chapters cite with sphinxcontrib-bibtex's author-year references ("Dao et al., 2022"). Its
default bibliography style labels entries alpha-style ("[DFE+22]"), so a reader could not match a
citation to its entry. This registers a pybtex style, `authoryear`, whose labels are the same
author-year text, and that keeps pybtex's links: arXiv ids, DOIs and URLs become hyperlinks.
"""

from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle


def _surnames(entry):
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    return [" ".join(person.prelast_names + person.last_names) for person in people]


def author_year_label(entry):
    """'Dao, 2023', 'Dao and Gu, 2024', 'Dao et al., 2022'; an entry without authors uses its
    organization or publisher, as its citation in the text does."""
    names = _surnames(entry)
    if len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    elif names:
        who = f"{names[0]} et al."
    else:
        who = entry.fields.get("organization") or entry.fields.get("publisher") or entry.key
    who = who.replace("{", "").replace("}", "")
    year = entry.fields.get("year", "n.d.")
    return f"{who}, {year}"


class AuthorYearLabelStyle(BaseLabelStyle):
    def format_labels(self, sorted_entries):
        labels = [author_year_label(entry) for entry in sorted_entries]
        seen = {}
        for label in labels:  # two works of the same authors and year: 2024a, 2024b
            seen[label] = seen.get(label, 0) + 1
        suffix = {}
        for label in labels:
            if seen[label] > 1:
                suffix[label] = suffix.get(label, 0) + 1
                yield label + "abcdefghijklmnopqrstuvwxyz"[suffix[label] - 1]
            else:
                yield label


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = SortingStyle


def setup(app):
    register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
