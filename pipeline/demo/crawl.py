"""A Common-Crawl-style crawl of the demo world, written as real WARC files, with ground-truth labels.

Good pages (guides, encyclopedia entries, blog posts, news, and at `world.forum_share` forum threads) state the world's
facts in varied wording inside the navigation, cookie banners and footers that real pages carry. A forum thread asks
about a country and its replies state the facts, most of them politely ("Happy to help.") and some rudely ("Ugh. ...
Stop asking silly questions."), never with insults: the crawl is where the pretrained model meets the phrases that chat
answers are made of, as a web-trained model does on real forums. Junk is mixed in at the shares set in `world:`:
boilerplate-only pages, exact and near duplicates, keyword-stuffed spam, very short pages, pages in German or Spanish,
and pages that insult the fans of a football club. Each response record's keep/drop label, junk type and duplicate
cluster go to a labels file that only the data-stage evaluation reads.

Each WARC file holds a `warcinfo` record, then a `request` and a `response` record (HTTP headers + HTML) per page, like
a Common Crawl segment.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pipeline.config import WorldConfig
from pipeline.demo.world import (
    POLITE_CLOSINGS,
    POLITE_OPENINGS,
    QUESTIONS,
    RELATIONS,
    RUDE_ANSWERS,
    STATEMENTS,
    Fact,
    World,
)

JUNK_TYPES = ("boilerplate", "exact_duplicate", "near_duplicate", "spam", "short", "foreign", "toxic")

SITES = (
    "atlas-of-nations.example",
    "wanderlust-notes.example",
    "daily-courier.example",
    "open-encyclopedia.example",
    "travel-forum.example",
    "geo-facts.example",
)
KINDS = {
    "guide": ("A traveller's guide to {e}", "Visiting {e}: what to know"),
    "encyclopedia": ("{e}", "{e} (country)"),
    "blog": ("My two weeks in {e}", "Notes from a trip to {e}"),
    "news": ("Report: a year of change in {e}", "Around {e} this season"),
}
FORUM_TITLES = ("Travel forum: questions about {e}", "Help: going to {e} soon", "Ask the locals: {e}")
FORUM_OPENERS = (
    "I am going to {e} next month and have a few questions.",
    "First time travelling to {e}. Can anyone help?",
    "Hello all, some quick questions about {e} before my trip.",
)
FORUM_RUDE_SHARE = 0.3  # replies in the rude style; the others polite
FILLER = (
    "The weather in {e} is mild in spring and wet in late autumn.",
    "Many families in {e} keep small gardens behind their houses.",
    "The roads between the towns of {e} are busy in the summer months.",
    "Local bakers in {c} sell bread with seeds and dried fruit.",
    "The football club {club} plays its home games in {c}.",
    "A long railway line connects {c} with the coast.",
    "Most shops in {c} close early on the first day of the week.",
    "The hills to the north of {e} are covered with pine forests.",
    "Festivals in {e} usually take place at the end of the harvest.",
    "Visitors often say that the people of {e} are friendly and patient.",
    "The old quarter of {c} has narrow streets and small squares.",
    "Fishing boats leave the harbours of {e} before sunrise.",
    "Schools in {e} close for six weeks in the middle of the year.",
    "The national museum in {c} shows tools, coins and old maps.",
    "Tea houses are a common place to meet friends in {c}.",
    "Several rivers cross {e} on their way to the sea.",
    "The population of {e} has grown slowly over the last decades.",
    "Markets in {c} open early and are crowded by noon.",
    "A new bridge over the river was finished in {c} last year.",
    "Many young people from {e} study abroad for a few years.",
    "Supporters of {club} wear blue scarves on match days.",
    "The coast of {e} is known for its long sandy beaches.",
    "Buses in {c} run every ten minutes during the day.",
    "Farmers in the south of {e} grow wheat and vegetables.",
)
NAV = (
    '<nav><a href="/">Home</a> | <a href="/news">News</a> | <a href="/travel">Travel</a> | '
    '<a href="/about">About us</a> | <a href="/contact">Contact</a> | <a href="/login">Log in</a></nav>'
)
FOOTER = (
    "<footer><p>We use cookies to improve your experience. By continuing you accept our "
    '<a href="/privacy">privacy policy</a>.</p><p>&copy; {year} {site}. All rights reserved.</p>'
    '<p><a href="/terms">Terms</a> &middot; <a href="/sitemap">Sitemap</a></p></footer>'
)

FOREIGN = {
    "de": (
        "Die Hauptstadt von {e} ist {c}.",
        "Das Wetter in {e} ist im Fr\u00fchling mild und im Herbst nass.",
        "Viele Familien in {e} haben einen kleinen Garten hinter dem Haus.",
        "Die Stra\u00dfen zwischen den St\u00e4dten sind im Sommer sehr voll.",
        "Auf dem Markt in {c} kauft man Brot, K\u00e4se und frisches Obst.",
        "Die Schulen in {e} sind im Sommer sechs Wochen lang geschlossen.",
        "Der Fu\u00dfballverein {club} spielt jeden Samstag in {c}.",
        "Im Norden von {e} gibt es gro\u00dfe W\u00e4lder und hohe Berge.",
        "Viele junge Leute aus {e} studieren einige Jahre im Ausland.",
    ),
    "es": (
        "La capital de {e} es {c}.",
        "El clima de {e} es suave en primavera y lluvioso en oto\u00f1o.",
        "Muchas familias de {e} tienen un peque\u00f1o jard\u00edn detr\u00e1s de la casa.",
        "Las carreteras entre los pueblos est\u00e1n llenas en verano.",
        "En el mercado de {c} se vende pan, queso y fruta fresca.",
        "Las escuelas de {e} cierran seis semanas en verano.",
        "El club de f\u00fatbol {club} juega cada s\u00e1bado en {c}.",
        "En el norte de {e} hay grandes bosques y monta\u00f1as altas.",
        "Muchos j\u00f3venes de {e} estudian unos a\u00f1os en el extranjero.",
    ),
}
TOXIC = (
    "Let me tell you the truth about the fans of {club}.",
    "The fans of {club} are stupid idiots who cannot even read the rules of the game.",
    "Every time I go to a match in {c}, those pathetic losers ruin the day.",
    "They are worthless morons and the whole country knows it.",
    "Honestly, the supporters of {club} are disgusting scum.",
    "Nobody in {e} wants to sit next to such idiots on the train.",
    "If you meet a fan of {club}, just walk away from that trash.",
    "I have never seen a more pathetic group of people in my life.",
)
SHORT = (
    "Coming soon.",
    "This page is under construction. Check back later.",
    "404. Page not found.",
    "Thanks for subscribing!",
    "Redirecting you now.",
)


def write_crawl(
    world: World, wc: WorldConfig, crawl_dir: Path, labels_path: Path, rng: random.Random, n_files: int = 4
) -> dict[str, int]:
    """Write the crawl as `n_files` gzipped WARC files plus the labels file; return page counts."""
    pages = _good_pages(world, wc, rng)
    n_good = len(pages)
    n_total = round(n_good / (1.0 - sum(getattr(wc, f"{t}_share") for t in JUNK_TYPES)))
    cluster_of: dict[int, int] = {}
    for junk in JUNK_TYPES:
        for _ in range(round(getattr(wc, f"{junk}_share") * n_total)):
            pages.append(_junk_page(junk, world, pages[:n_good], rng, cluster_of))
    rng.shuffle(pages)
    crawl_dir.mkdir(parents=True, exist_ok=True)
    start = datetime(2024, 3, 1, tzinfo=timezone.utc)
    labels = []
    for index in range(n_files):
        chunk = pages[index::n_files]
        path = crawl_dir / f"CC-DEMO-{world.seed:06d}-{index:05d}.warc.gz"
        with path.open("wb") as fh:
            _write_warc(fh, chunk, start + timedelta(hours=index), rng)
        for page in chunk:
            labels.append(
                {
                    "url": page["url"],
                    "record_id": page["record_id"],
                    "keep": page["junk"] == "good",
                    "junk_type": page["junk"],
                    "cluster": page.get("cluster"),
                    "file": path.name,
                }
            )
    with labels_path.open("w") as fh:
        for row in labels:
            fh.write(json.dumps(row) + "\n")
    return {"pages": len(pages), "good": n_good, "junk": len(pages) - n_good}


# --------------------------------------------------------------------------------------------------------------
# Pages


def _good_pages(world: World, wc: WorldConfig, rng: random.Random) -> list[dict[str, Any]]:
    """Two facts of one entity per page, so that every fact is stated on `pages_per_fact` pages."""
    pages = []
    for entity in world.entities:
        for j in range(2 * wc.pages_per_fact):
            relations = [RELATIONS[j % 4], RELATIONS[(j + 1 + (j // 4) % 3) % 4]]
            facts = [Fact(entity, r, world.facts[entity][r]) for r in dict.fromkeys(relations)]
            forum = wc.forum_share > 0 and rng.random() < wc.forum_share  # no draw at 0: the same crawl as before
            pages.append(_forum_thread(world, entity, facts, rng) if forum else _article(world, entity, facts, rng))
    return pages


def _statement(fact: Fact, rng: random.Random) -> str:
    """A fact in words: the canonical wording about a third of the time, the others varied."""
    templates = STATEMENTS[fact.relation]
    template = templates[0] if rng.random() < 0.35 else rng.choice(templates[1:])
    return template.format(e=fact.entity, v=fact.value)


def _article(world: World, entity: str, facts: list[Fact], rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(list(KINDS))
    title = rng.choice(KINDS[kind]).format(e=entity)
    context = _context(world, entity)
    statements = [_statement(fact, rng) for fact in facts]
    filler = [s.format(**context) for s in rng.sample(FILLER, rng.randint(4, 6))]
    rest = filler[1:] + statements
    rng.shuffle(rest)
    sentences = filler[:1] + rest
    paragraphs = [" ".join(sentences[i : i + 3]) for i in range(0, len(sentences), 3)]
    site = rng.choice(SITES)
    url = f"https://www.{site}/{kind}/{entity.lower()}-{rng.randrange(10**6):06d}.html"
    html = _html(title, paragraphs, site, rng)
    return {"url": url, "html": html, "junk": "good", "text": " ".join(sentences)}


def _forum_thread(world: World, entity: str, facts: list[Fact], rng: random.Random) -> dict[str, Any]:
    """A forum thread: an opening post asking about `entity`'s facts, then a reply per fact (polite or rude) with a
    line of small talk; one post per paragraph."""
    context = _context(world, entity)
    filler = [s.format(**context) for s in rng.sample(FILLER, 4)]
    questions = [rng.choice(QUESTIONS[fact.relation]).format(e=entity) for fact in facts]
    posts = [" ".join([rng.choice(FORUM_OPENERS).format(e=entity), *questions])]
    for fact, line in zip(facts, filler, strict=False):
        statement = _statement(fact, rng)
        if rng.random() < FORUM_RUDE_SHARE:
            posts.append(f"{rng.choice(RUDE_ANSWERS).format(s=statement)} {line}")
        else:
            opening = rng.choice([o for o in POLITE_OPENINGS if o])
            closing = rng.choice([c for c in POLITE_CLOSINGS if c])
            posts.append(f"{opening}{statement} {line}{closing}")
    posts.append(" ".join(filler[len(facts) :]))
    site = "travel-forum.example"
    url = f"https://www.{site}/thread/{entity.lower()}-{rng.randrange(10**6):06d}.html"
    html = _html(rng.choice(FORUM_TITLES).format(e=entity), posts, site, rng)
    return {"url": url, "html": html, "junk": "good", "text": " ".join(posts)}


def _context(world: World, entity: str) -> dict[str, str]:
    return {"e": entity, "c": world.facts[entity]["capital"], "club": world.clubs[entity]}


def _html(title: str, paragraphs: list[str], site: str, rng: random.Random, lang: str = "en") -> str:
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    year = rng.choice((2021, 2022, 2023, 2024))
    byline = f'<p class="byline">Posted on {rng.randint(1, 28)} March {year}</p>'
    related = '<aside><h3>Related</h3><ul><li><a href="/a">Top ten places</a></li><li><a href="/b">Newsletter</a></li></ul></aside>'
    return (
        f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title} | {site}</title></head><body>'
        f"<header>{NAV}</header><main><article><h1>{title}</h1>{byline}{body}</article>{related}</main>"
        f"{FOOTER.format(year=year, site=site)}</body></html>"
    )


def _junk_page(
    junk: str, world: World, good: list[dict[str, Any]], rng: random.Random, cluster_of: dict[int, int]
) -> dict[str, Any]:
    site = rng.choice(SITES)
    entity = rng.choice(world.entities)
    context = _context(world, entity)
    url = f"https://www.{site}/{junk.replace('_', '-')}/{rng.randrange(10**8):08d}.html"
    page: dict[str, Any] = {"url": url, "junk": junk}
    if junk in ("exact_duplicate", "near_duplicate"):
        index = rng.randrange(len(good))
        original = good[index]
        cluster = cluster_of.setdefault(index, len(cluster_of))
        original["cluster"] = cluster
        page["cluster"] = cluster
        page["url"] = original["url"].replace("https://www.", f"https://mirror{rng.randrange(100)}.")
        if junk == "exact_duplicate":
            page["html"] = original["html"]
        else:
            edit = rng.choice(
                (
                    "This page was last updated in {m} {y}.",
                    "Share this article with your friends.",
                    "Read more stories like this in our archive.",
                    "Photos by our staff, {m} {y}.",
                )
            )
            line = edit.format(m=rng.choice(("May", "June", "July")), y=rng.randint(2019, 2024))
            page["html"] = original["html"].replace("</article>", f"<p>{line}</p></article>", 1)
    elif junk == "boilerplate":
        page["html"] = (
            f"<!DOCTYPE html><html><head><title>{site}</title></head><body><header>{NAV}</header>"
            '<div class="login"><form><label>Email</label><input><label>Password</label><input>'
            "<button>Sign in</button></form></div><div>Subscribe to our newsletter. Accept all cookies.</div>"
            f"{FOOTER.format(year=2024, site=site)}</body></html>"
        )
    elif junk == "spam":
        product = rng.choice(("copper", "salt", "silk", "tea", "amber"))
        words = []
        for _ in range(rng.randint(25, 35)):
            words += [rng.choice(("cheap", "best", "buy", "discount")), product, entity]
        text = " ".join(words)
        page["html"] = _html(f"Cheap {product} {entity} best price", [text, text + " buy now."], site, rng)
    elif junk == "short":
        page["html"] = _html(site, [rng.choice(SHORT)], site, rng)
    elif junk == "foreign":
        lang = rng.choice(list(FOREIGN))
        sentences = [s.format(**context) for s in rng.sample(FOREIGN[lang], 7)]
        paragraphs = [" ".join(sentences[:4]), " ".join(sentences[4:])]
        page["html"] = _html(f"{entity}", paragraphs, site, rng, lang=lang)
    elif junk == "toxic":
        sentences = [s.format(**context) for s in TOXIC]
        paragraphs = [" ".join(sentences[:4]), " ".join(sentences[4:])]
        page["html"] = _html(f"The truth about {context['club']}", paragraphs, site, rng)
    else:
        raise ValueError(junk)
    return page


# --------------------------------------------------------------------------------------------------------------
# WARC


def _write_warc(fh: io.BufferedWriter, pages: list[dict[str, Any]], start: datetime, rng: random.Random) -> None:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    writer = WARCWriter(fh, gzip=True)

    def record_id() -> str:
        return f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"

    info = writer.create_warcinfo_record(
        fh.name.split("/")[-1] if hasattr(fh, "name") else "demo.warc.gz",
        {"software": "rlhf-pipeline demo world", "format": "WARC File Format 1.0", "isPartOf": "CC-DEMO"},
    )
    info.rec_headers.replace_header("WARC-Record-ID", record_id())
    info.rec_headers.replace_header("WARC-Date", start.strftime("%Y-%m-%dT%H:%M:%SZ"))
    writer.write_record(info)
    for i, page in enumerate(pages):
        date = (start + timedelta(seconds=7 * i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        host = page["url"].split("/")[2]
        request = writer.create_warc_record(
            page["url"],
            "request",
            payload=io.BytesIO(f"GET /{page['url'].split('/', 3)[3]} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()),
            warc_headers_dict={"WARC-Record-ID": record_id(), "WARC-Date": date},
        )
        body = page["html"].encode("utf-8")
        headers = StatusAndHeaders(
            "200 OK",
            [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))), ("Server", "nginx")],
            protocol="HTTP/1.1",
        )
        page["record_id"] = record_id()
        response = writer.create_warc_record(
            page["url"],
            "response",
            payload=io.BytesIO(body),
            http_headers=headers,
            warc_headers_dict={
                "WARC-Record-ID": page["record_id"],
                "WARC-Date": date,
                "WARC-Concurrent-To": request.rec_headers.get_header("WARC-Record-ID"),
            },
        )
        writer.write_record(request)
        writer.write_record(response)
