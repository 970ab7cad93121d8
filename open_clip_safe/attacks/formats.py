"""Streaming readers and writers of open_clip's two training-data formats, sample by sample.

Webdataset: tar shards whose members `{key}.{ext}` group into samples (webdataset's key rule: the
name up to the first dot of its base name). CSV: one row per sample, its key the row index (as in
open_clip_safe.data). Writers copy every member / cell they do not change byte for byte, and write
tar members with fixed metadata so that the same input and seed give the same bytes.
"""
import csv
import io
import json
import os
import re
import tarfile
import zlib
from pathlib import Path

from PIL import Image

from ..cli import UsageError, progress
from ..files import IMAGE_EXTENSIONS, png_bytes, shard_list

KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


class AttackError(UsageError):
    """Bad input: reported as one line on stderr, exit status 2."""


def progress_bar(show, **kwargs):
    # delayed: quick runs (and quick failures) print no progress, so an error stays the only stderr line
    return progress(enabled=show, delay=1, **kwargs)


def decode_image(data, where):
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise AttackError(f"cannot decode the image of {where}: {error}") from None


def is_csv(spec):
    return str(spec).lower().endswith((".csv", ".tsv"))


def expand_spec(spec):
    """open_clip's shard list: `::`-separated brace specs (`/x/{000000..000007}.tar`)."""
    shards = shard_list(spec)
    remote = [path for path in shards if re.match(r"^\w+:", path) and not os.path.exists(path)]
    if remote:
        raise AttackError(f"only local shard files can be read, not {remote[0]}")
    return shards


def meta_fields(poisoned, attack, target):
    return {"poisoned": bool(poisoned), "attack": attack, "target": target if poisoned else None}


class Edit:
    """What an attack does to one sample: a new image and/or caption (None keeps it)."""

    def __init__(self, target, image=None, caption=None):
        self.target, self.image, self.caption = target, image, caption


class Injection:
    """An extra sample an attack adds (targeted poisoning)."""

    def __init__(self, key, png, image_file, caption, label, meta):
        self.key, self.png, self.image_file, self.caption, self.label, self.meta = (
            key, png, image_file, caption, label, meta)


# ---------------------------------------------------------------- webdataset


class WdsSample:
    def __init__(self, shard, key, members):
        self.shard, self.key, self.members = shard, key, members  # members: [(ext, bytes)] in tar order

    def find(self, *exts):
        return next((i for i, (ext, _) in enumerate(self.members) if ext.lower() in exts), None)

    @property
    def caption(self):
        where = self.find("txt")
        return None if where is None else self.members[where][1].decode("utf-8", errors="replace")

    @property
    def eligible(self):
        return self.find(*IMAGE_EXTENSIONS) is not None and self.find("txt") is not None

    @property
    def poisoned_before(self):
        """An earlier attack's poison (json says so): never picked again when attacks are chained."""
        where = self.find("json")
        try:
            return where is not None and json.loads(self.members[where][1]).get("poisoned") is True
        except (ValueError, AttributeError):
            return False

    def load_image(self):
        return decode_image(self.members[self.find(*IMAGE_EXTENSIONS)][1], f"sample {self.key} in {self.shard}")

    def label(self):
        where = self.find("cls")
        if where is None or self.find(*IMAGE_EXTENSIONS) is None:
            raise AttackError(f"sample {self.key} in {self.shard} has no image or no cls field: "
                              "target images must be labelled")
        try:
            return int(self.members[where][1].decode().strip())
        except ValueError:
            raise AttackError(f"sample {self.key} in {self.shard}: cls is not an integer") from None

    def output(self, edit, attack):
        """(members to write, poisoned before): the image / caption replaced where `edit` says, json
        gaining poison fields; a sample an earlier attack marked poisoned and this one leaves alone
        keeps its json (attacks can be chained)."""
        members = list(self.members)
        if edit is not None and edit.image is not None:
            members[self.find(*IMAGE_EXTENSIONS)] = ("png", png_bytes(edit.image))
        if edit is not None and edit.caption is not None:
            members[self.find("txt")] = (members[self.find("txt")][0], edit.caption.encode())
        where = self.find("json")
        meta = {}
        if where is not None:
            try:
                meta = json.loads(members[where][1])
            except ValueError as error:
                raise AttackError(f"sample {self.key} in {self.shard}: bad json ({error})") from None
        if edit is None and meta.get("poisoned") is True:
            return members, True
        meta.update(meta_fields(edit is not None, attack, edit.target if edit is not None else None))
        encoded = ("json", json.dumps(meta).encode())
        if where is None:
            members.append(encoded)
        else:
            members[where] = (members[where][0], encoded[1])
        return members, False


def read_shard(path):
    """The samples of one tar shard in order; AttackError naming the file if it cannot be read."""
    try:
        with tarfile.open(path, "r|*") as tar:
            key, members = None, []
            for info in tar:
                match = KEY_EXT.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                data = tar.extractfile(info).read()
                if match[1] != key and members:
                    yield WdsSample(path, key, members)
                    members = []
                key = match[1]
                members.append((match[2], data))
            if members:
                yield WdsSample(path, key, members)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
        raise AttackError(f"cannot read shard {path}: {error}") from None


class TarSink:
    """A tar file written with fixed member metadata (reproducible bytes)."""

    def __init__(self, path):
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)

    def write(self, key, members):
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self.tar.addfile(info, io.BytesIO(data))

    def close(self):
        self.tar.close()


class WdsData:
    format = "wds"

    def __init__(self, spec):
        self.spec = spec
        self.shards = expand_spec(spec)
        for shard in self.shards:
            if not os.path.isfile(shard):
                raise AttackError(f"missing shard {shard}")
        self.sizes = {}  # shard path -> count, from the sizes.json beside it (where there is one)
        for folder in dict.fromkeys(os.path.dirname(shard) for shard in self.shards):
            sizes = os.path.join(folder, "sizes.json")
            try:
                counts = json.loads(Path(sizes).read_text()) if os.path.isfile(sizes) else {}
                self.sizes.update({os.path.join(folder, name): int(count) for name, count in counts.items()})
            except (OSError, ValueError, TypeError, AttributeError) as error:
                raise AttackError(f"cannot read {sizes}: {error}") from None
        known = [self.sizes.get(shard) for shard in self.shards]
        self.expected_total = None if None in known else sum(known)

    def samples(self):
        for shard in self.shards:
            yield from self.samples_of(shard)

    def samples_of(self, shard):
        """A shard's samples; a count that disagrees with sizes.json is an error (a tar cut at a member
        boundary reads as a shorter, valid tar: only the count shows it)."""
        count = 0
        for sample in read_shard(shard):
            count += 1
            yield sample
        expected = self.sizes.get(shard)
        if expected is not None and expected != count:
            raise AttackError(f"shard {shard} holds {count} samples but its sizes.json says {expected}")

    def write(self, out, plan, record, progress):
        """Write input shard i as out/{i:06d}.tar with the plan applied; returns (spec, total)."""
        sizes, index, last = {}, 0, len(self.shards) - 1
        with progress_bar(progress, total=self.expected_total, desc="poison", unit="sample") as bar:
            for shard_index, shard in enumerate(self.shards):
                name = f"{shard_index:06d}.tar"
                sink, count = TarSink(out / name), 0

                def inject(position):
                    nonlocal count
                    for injection in plan.due(position):
                        sink.write(injection.key, self.injected_members(injection))
                        record(injection.key)
                        count += 1

                try:
                    for sample in self.samples_of(shard):
                        inject(index)
                        edit = plan.edit(sample)
                        members, before = sample.output(edit, plan.attack)
                        sink.write(sample.key, members)
                        if edit is not None or before:
                            record(sample.key, before)
                        index, count = index + 1, count + 1
                        bar.update()
                    if shard_index == last:
                        inject(index)
                finally:
                    sink.close()
                sizes[name] = count
        (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
        spec = out / ("000000.tar" if last == 0 else f"{{000000..{last:06d}}}.tar")
        return str(spec), sum(sizes.values())

    @staticmethod
    def injected_members(injection):
        return [("png", injection.png), ("txt", injection.caption.encode()), ("cls", str(injection.label).encode()),
                ("json", json.dumps(injection.meta).encode())]


# ---------------------------------------------------------------- CSV


class CsvSample:
    def __init__(self, data, index, row):
        self.data, self.index, self.row, self.key = data, index, row, str(index)

    def cell(self, column):
        where = self.data.columns.get(column)
        return self.row[where] if where is not None and where < len(self.row) else ""

    @property
    def caption(self):
        return self.cell(self.data.caption_key)

    @property
    def eligible(self):
        return bool(self.cell(self.data.img_key))

    @property
    def poisoned_before(self):
        return self.cell("poisoned").strip() in ("1", "1.0", "True", "true")

    def load_image(self):
        path = self.cell(self.data.img_key)
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise AttackError(f"row {self.index} of {self.data.path}: cannot read image {path}: "
                              f"{error.strerror or error}") from None
        return decode_image(data, f"row {self.index} of {self.data.path} ({path})")

    def label(self):
        try:
            return int(float(self.cell(self.data.label_key)))
        except ValueError:
            raise AttackError(f"row {self.index} of {self.data.path}: label "
                              f"{self.cell(self.data.label_key)!r} is not an integer") from None


class CsvData:
    format = "csv"

    def __init__(self, path, separator, img_key, caption_key, label_key, labelled=False):
        """Training data needs the image and caption columns (a label column, if present, is filled in
        for injected rows); labelled test data needs the image and label columns."""
        self.path, self.separator = str(path), separator
        self.img_key, self.caption_key, self.label_key = img_key, caption_key, label_key
        try:
            with open(self.path, newline="", encoding="utf-8") as file:
                header = next(csv.reader(file, delimiter=separator), [])
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            raise AttackError(f"cannot read {self.path}: {getattr(error, 'strerror', None) or error}") from None
        self.header = header
        self.columns = {name: i for i, name in enumerate(header)}
        wanted = (img_key, label_key) if labelled else (img_key, caption_key)
        missing = [key for key in wanted if key not in self.columns]
        if missing:
            raise AttackError(f"{self.path} has no column {', '.join(map(repr, missing))} "
                              f"(columns: {', '.join(header) or 'none'}; separator {separator!r})")
        self.expected_total = None

    def samples(self):
        try:
            with open(self.path, newline="", encoding="utf-8") as file:
                rows = csv.reader(file, delimiter=self.separator)
                next(rows, None)
                for index, row in enumerate(rows):
                    yield CsvSample(self, index, row)
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            raise AttackError(f"cannot read {self.path}: {error}") from None

    def write(self, out, plan, record, progress):
        """Write out/<input name> (input columns + `poisoned` and `attack`) and the new images under out/images."""
        header = self.header + [column for column in ("poisoned", "attack") if column not in self.columns]
        flag, attack = header.index("poisoned"), header.index("attack")
        image_dir = out / "images"
        image_dir.mkdir(exist_ok=True)
        target = out / os.path.basename(self.path)
        total = 0
        with open(target, "w", newline="", encoding="utf-8") as file, \
                progress_bar(progress, desc="poison", unit="sample") as bar:
            writer = csv.writer(file, delimiter=self.separator, lineterminator="\n")
            writer.writerow(header)

            def inject(position):
                nonlocal total
                for injection in plan.due(position):
                    row = [""] * len(header)
                    row[self.columns[self.img_key]] = injection.image_file
                    row[self.columns[self.caption_key]] = injection.caption
                    if self.label_key in self.columns:
                        row[self.columns[self.label_key]] = str(injection.label)
                    row[flag], row[attack] = "1", plan.attack
                    writer.writerow(row)
                    record(str(total))
                    total += 1

            seen = 0
            for sample in self.samples():
                inject(seen)
                edit = plan.edit(sample)
                row = sample.row + [""] * (len(header) - len(sample.row))
                if edit is not None and edit.image is not None:
                    path = (image_dir / f"{sample.key}.png").resolve()
                    path.write_bytes(png_bytes(edit.image))
                    row[self.columns[self.img_key]] = str(path)
                if edit is not None and edit.caption is not None:
                    row[self.columns[self.caption_key]] = edit.caption
                before = edit is None and sample.poisoned_before
                row[flag] = "1" if edit is not None or before else "0"
                if edit is not None:
                    row[attack] = plan.attack
                writer.writerow(row)
                if edit is not None or before:
                    record(str(total), before)
                total, seen = total + 1, seen + 1
                bar.update()
            inject(seen)
        return str(target.resolve()), total


def open_data(spec, args, labelled=False):
    """The reader for `spec`: a CSV/TSV file by its suffix, else webdataset shards."""
    if is_csv(spec):
        return CsvData(spec, args.csv_separator, args.csv_img_key, args.csv_caption_key, args.csv_label_key,
                       labelled)
    return WdsData(spec)
