"""Build the quickstart's raw corpus from the Python that runs it — no download.

Clean documents come from the installed standard library: the language-reference help
topics that ``help()`` shows (``pydoc_data.topics``) and the docstrings of widely used
modules. Then noise is planted on purpose, so every step of the DataPipeline has something
to remove and the report's funnel shows it working:

========================  =========================================  =====================
planted                   how                                        caught by
========================  =========================================  =====================
exact duplicates          clean documents copied verbatim            dedup (exact)
near duplicates           copies with a few words changed            dedup (MinHash)
spam                      repetitive link-bait                       quality (Gopher rep.)
too short / boilerplate   one-liners, lorem ipsum                    quality (Gopher, C4)
another language          German, French and Spanish paragraphs      language
toxic                     documents full of listed words             toxicity
PII                       e-mails, phone numbers, IPs, keys          pii (redacted, kept)
========================  =========================================  =====================

Every choice is seeded, so the same Python gives the same corpus byte for byte; the file is
rewritten only when its content changes (the runner fingerprints inputs by content).

    python build_corpus.py --out DIR        # writes DIR/stdlib-docs.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

MODULES = (  # noqa: SIM905 - a readable list of module names
    "abc argparse array ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses "
    "datetime decimal difflib email enum fnmatch fractions functools gettext glob gzip hashlib heapq hmac "
    "html http.client inspect io ipaddress itertools json logging math mimetypes operator os pathlib pickle "
    "pprint queue random re sched secrets shlex shutil socket sqlite3 statistics string struct subprocess "
    "tarfile tempfile textwrap threading time timeit tokenize traceback types typing unittest urllib.parse "
    "uuid warnings weakref zipfile zlib"
).split()

MAX_WORDS = 450
MIN_WORDS = 60

FOREIGN = [
    ("de", "Die Standardbibliothek von Python enthält viele nützliche Module. Mit dem Modul json kann man "
           "Daten in Zeichenketten umwandeln und wieder einlesen. Die Funktion sorted gibt eine neue sortierte "
           "Liste zurück, während die Methode sort die Liste selbst verändert. Ein Wörterbuch speichert Paare "
           "aus Schlüsseln und Werten, und mit einer Schleife kann man über alle Einträge gehen. Wer Dateien "
           "lesen möchte, öffnet sie am besten mit einer with-Anweisung, damit sie wieder geschlossen werden. "
           "Ausnahmen werden mit try und except behandelt, und eigene Klassen erben von anderen Klassen."),
    ("fr", "La bibliothèque standard de Python contient de nombreux modules utiles. Le module json permet de "
           "convertir des données en chaînes de caractères et de les relire ensuite. La fonction sorted renvoie "
           "une nouvelle liste triée, tandis que la méthode sort modifie la liste elle-même. Un dictionnaire "
           "associe des clés à des valeurs, et une boucle permet de parcourir toutes les entrées. Pour lire un "
           "fichier, il vaut mieux l'ouvrir avec une instruction with afin qu'il soit refermé. Les exceptions "
           "sont traitées avec try et except, et les classes peuvent hériter d'autres classes."),
    ("es", "La biblioteca estándar de Python contiene muchos módulos útiles. El módulo json permite convertir "
           "datos en cadenas de texto y volver a leerlos después. La función sorted devuelve una lista nueva y "
           "ordenada, mientras que el método sort modifica la propia lista. Un diccionario guarda pares de "
           "claves y valores, y con un bucle se pueden recorrer todas las entradas. Para leer un archivo es "
           "mejor abrirlo con una sentencia with, de modo que se cierre al terminar. Las excepciones se tratan "
           "con try y except, y las clases pueden heredar de otras clases."),
]
SPAM = (
    "BUY NOW!!! Best cheap python course click here click here click here. Limited offer, limited offer, "
    "limited offer. Get rich with python today, get rich with python today. Click here now. "
)
TOXIC_WORDS = ("crap", "damn", "shit", "bastard", "idiot", "stupid")
LOREM = (
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et "
    "dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip "
    "ex ea commodo consequat. Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu "
    "fugiat nulla pariatur. Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt "
    "mollit anim id est laborum. "
)


def words(text: str) -> int:
    return len(text.split())


def clean(text: str) -> str:
    text = inspect.cleandoc(text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def chunk(text: str, limit: int = MAX_WORDS) -> list[str]:
    """Split on paragraphs into pieces of at most ``limit`` words (a longer paragraph stays whole)."""
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for para in text.split("\n\n"):
        n = words(para)
        if current and count + n > limit:
            pieces.append("\n\n".join(current))
            current, count = [], 0
        current.append(para)
        count += n
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def topic_documents() -> list[tuple[str, str]]:
    try:
        import pydoc_data.topics
    except ImportError:  # some distributions package help() topics separately
        print("note: pydoc_data is not installed; the corpus uses docstrings only", file=sys.stderr)
        return []
    docs = []
    for name in sorted(pydoc_data.topics.topics):
        for i, piece in enumerate(chunk(clean(pydoc_data.topics.topics[name]))):
            docs.append((f"topic/{name}/{i}", piece))
    return docs


def module_documents() -> list[tuple[str, str]]:
    docs = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [f"The {name} module.", clean(module.__doc__ or "")]
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", name) not in (name, f"_{name}", None):
                continue
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            first = doc.split("\n\n")[0].replace("\n", " ").strip()
            if words(first) >= 4:
                parts.append(f"{name}.{attr}: {first}")
        for i, piece in enumerate(chunk("\n\n".join(p for p in parts if p))):
            docs.append((f"module/{name}/{i}", piece))
    return docs


def plant_noise(clean_docs: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    noise: list[tuple[str, str]] = []
    sample = rng.sample(clean_docs, 40)
    for doc_id, text in sample[:15]:  # exact duplicates
        noise.append((f"{doc_id}#copy", text))
    for doc_id, text in sample[15:30]:  # near duplicates: a few words changed, a line added
        ws = text.split(" ")
        for _ in range(max(1, len(ws) // 80)):
            i = rng.randrange(len(ws))
            ws[i] = ws[i].upper()
        noise.append((f"{doc_id}#near", " ".join(ws) + "\n\nSee also the Python documentation."))
    for i in range(8):  # spam
        noise.append((f"spam/{i}", SPAM * rng.randint(4, 8)))
    for i in range(6):  # too short
        noise.append((f"short/{i}", rng.choice(["Click to expand.", "Loading...", "Page 3 of 7", "Home | About"])))
    for i in range(4):  # lorem ipsum
        noise.append((f"lorem/{i}", LOREM * 3))
    for i, (lang, text) in enumerate(FOREIGN * 3):  # another language
        noise.append((f"foreign/{lang}/{i}", text))
    for i, (_doc_id, text) in enumerate(sample[30:36]):  # toxic
        ws = text.split(" ")
        for _ in range(len(ws) // 6):
            ws.insert(rng.randrange(len(ws)), rng.choice(TOXIC_WORDS))
        noise.append((f"toxic/{i}", " ".join(ws)))
    for i, (doc_id, text) in enumerate(sample[36:40]):  # PII: redacted, not dropped
        contact = (f"\n\nQuestions? Write to maintainer{i}@example.org or call +1 415 555 01{i:02d}. "
                   f"The build server is at 10.0.{i}.17 and its token is sk-{'a1b2c3d4' * 4}.")
        noise.append((f"{doc_id}#pii", text + contact))
    return noise


def build(out_dir: Path, seed: int = 0) -> tuple[Path, int, int]:
    rng = random.Random(seed)
    clean_docs = [d for d in topic_documents() + module_documents() if words(d[1]) >= MIN_WORDS]
    noise = plant_noise(clean_docs, rng)
    docs = clean_docs + noise
    rng.shuffle(docs)
    lines = "".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "stdlib-docs.jsonl"
    if not path.exists() or path.read_text(encoding="utf-8") != lines:
        path.write_text(lines, encoding="utf-8")
    return path, len(clean_docs), len(noise)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write stdlib-docs.jsonl into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path, n_clean, n_noise = build(args.out, args.seed)
    print(f"corpus: {n_clean + n_noise} documents ({n_clean} from Python {sys.version.split()[0]}'s standard "
          f"library, {n_noise} planted noise) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
