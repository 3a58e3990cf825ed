"""
olmOCR-mix-1025 (allenai/olmOCR-mix-1025): ~270K single-page PDFs with GPT-4.1 plain text in reading order
(tables as HTML, equations as \\( \\) / \\[ \\]). Per subset one parquet per split ({subset}_{split}.parquet,
split 'train' or 'eval') whose pdf_relpath points into pdf_tarballs/*.tar.gz. Each PDF page is rendered to a
1280 px image, turned upright where the row says it is not (rotation_correction, as olmOCR's own pipeline does);
the response is natural_text.
"""
import os
import tarfile
from collections import defaultdict

from PIL import Image

from config import MARKDOWN_NO_GROUNDING, image_prompt
from dataset import MissingSplit, save_image
from tasks.common import PreparedTask

SUBSETS = ("00_documents", "01_books", "02_loc_transcripts", "03_national_archives")
RENDER_LONG_SIDE = 1280
UPRIGHT = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def render_pdf_page(pdf_bytes, long_side=RENDER_LONG_SIDE):
    import pypdfium2 as pdfium
    pdf = pdfium.PdfDocument(pdf_bytes)
    page = pdf[0]
    width, height = page.get_size()
    image = page.render(scale=long_side / max(width, height)).to_pil().convert("RGB")
    pdf.close()
    return image


class OlmOCR(PreparedTask):
    name, hf_id = "olmocr", "allenai/olmOCR-mix-1025"
    val_split = "eval"

    def rows(self, split):
        import pyarrow.parquet as pq
        if self.local() and not any(os.path.exists(self.file(f"{s}_{split}.parquet")) for s in SUBSETS):
            raise MissingSplit(f"{self.source} has no {{subset}}_{split}.parquet (fetch them with `hf download "
                               f"{self.hf_id} --repo-type dataset --include '*_{split}.parquet'`)")
        for subset in SUBSETS:
            parquet = self.file(f"{subset}_{split}.parquet")
            if self.local() and not os.path.exists(parquet):
                continue  # a local copy may hold only some subsets
            by_tarball = defaultdict(dict)
            for row in pq.read_table(parquet).to_pylist():
                tarball, _, member = (row.get("pdf_relpath") or "").partition(":")
                if tarball:
                    by_tarball[tarball][member] = row
            for tarball in sorted(by_tarball):
                with tarfile.open(self.file(tarball)) as tf:
                    for member in tf:
                        row = by_tarball[tarball].get(member.name.removeprefix("./")) if member.isfile() else None
                        if row is not None:
                            yield dict(row, pdf_bytes=tf.extractfile(member).read())

    def to_sample(self, row, index, image_dir):
        text = (row.get("natural_text") or "").strip()
        if not text:
            self.tally["pages without text"] += 1
            return None
        try:
            image = render_pdf_page(row["pdf_bytes"])
        except Exception:  # a broken PDF: skip the row, the preparation goes on
            self.tally["PDFs that do not render"] += 1
            return None
        turn = UPRIGHT.get(int(row.get("rotation_correction") or 0) % 360)
        if row.get("is_rotation_valid") is False and turn is not None:
            image = image.transpose(turn)  # PIL turns counter-clockwise, as olmOCR's pipeline reads the correction
            self.tally["pages turned upright"] += 1
        path = save_image(image, os.path.join(image_dir, f"{index:08d}.png"))
        return dict(text=image_prompt(MARKDOWN_NO_GROUNDING), response=text, image_path=path)
