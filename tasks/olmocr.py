"""
olmOCR-mix-1025 (allenai/olmOCR-mix-1025): ~270K single-page PDFs with GPT-4.1 plain text in reading order
(tables as HTML, equations as \\( \\) / \\[ \\]). Per subset one parquet per split ({subset}_{split}.parquet,
split 'train' or 'eval') whose pdf_relpath points into pdf_tarballs/*.tar.gz. Each PDF page is rendered to a
1280 px image; the response is natural_text.
"""
import os
import tarfile
from collections import defaultdict

from config import MARKDOWN_NO_GROUNDING
from dataset import save_image
from tasks.common import PreparedTask

SUBSETS = ("00_documents", "01_books", "02_loc_transcripts", "03_national_archives")
RENDER_LONG_SIDE = 1280


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

    @staticmethod
    def to_sample(row, index, image_dir):
        text = (row.get("natural_text") or "").strip()
        if not text or row.get("is_rotation_valid") is False:
            return None
        try:
            image = render_pdf_page(row["pdf_bytes"])
        except Exception:  # a broken PDF: skip the row, the preparation goes on
            return None
        path = save_image(image, os.path.join(image_dir, f"{index:08d}.png"))
        return dict(text=f"<image>\n{MARKDOWN_NO_GROUNDING}", response=text, image_path=path)
