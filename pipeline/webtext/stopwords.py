"""Stop-word lists of the model-free language test (filters.py), kept apart from datatrove so that
checking a web-text recipe, or the state of a finished webtext stage, needs no datatrove."""

from __future__ import annotations

# Stop words of the languages the model-free language test knows: the most frequent function words of each language,
# chosen to overlap little across languages (no "a", "die", "in", "was", "de", "la").
STOP_WORDS: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the of and to is are was were that this with for from by it its on at as be been has have had not but or "
        "which who what when where their there they them he she his her our you your we than then these "
        "those into about after before because very would could should will can more most other some such".split()
    ),
    "de": frozenset(
        "der das und ist nicht ein eine einen dem den des mit sich auf für von zu auch es sind wird werden wurde "
        "oder aber bei nach wie noch nur kann ich sie wir ihr mein dein sein ihre diese dieser dass wenn über".split()
    ),
    "fr": frozenset(
        "le les des et est une un du pour pas que qui dans sur au aux avec ce cette ces sont ont être il elle ils "
        "nous vous leur leurs mais ou où son sa ses plus comme fait tout très été".split()
    ),
    "es": frozenset(
        "el los las del y es una un por para con que se su sus está están como pero más fue son ha han muy "
        "también sobre entre cuando donde esta este estos ellos nosotros".split()
    ),
}
