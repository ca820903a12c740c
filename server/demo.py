"""`imagesearch serve --demo`: index sample photos and show a first search result.

A newcomer's first minute: the server indexes a few real photos (shipped by
scikit-image and scikit-learn, so nothing is downloaded) plus edited copies,
asks it over gRPC for the photos most like a new edited copy, prints the
ranking and writes an HTML contact sheet. Then the same collection, which keeps
SIFT local features, is asked for a photo pasted small into another one, first
as it is and then re-ranked by geometric verification: the two-stage recipe.
Everything goes through the real client and the real server, exactly as an
application would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from imagesearch.client import ImageItem, ImageSearchClient
from imagesearch.server.contact_sheet import SheetItem, render_contact_sheet

log = logging.getLogger(__name__)

DEMO_COLLECTION = "demo"
LOCAL_FEATURES = "sift"
RERANK_DEPTH = 20


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos from registry packages, as BGR arrays, keyed by a readable name."""
    photos: dict[str, np.ndarray] = {}
    try:
        from skimage import data as skdata

        # Colour photos bundled in the wheel (others are fetched on demand, which we never do).
        for name in ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"):
            loader = getattr(skdata, name, None)
            if loader is not None:
                try:
                    photos[name] = cv2.cvtColor(np.asarray(loader()), cv2.COLOR_RGB2BGR)
                except Exception as exc:
                    log.info("skipping sample %s: %s", name, exc)
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_image

        for name in ("china.jpg", "flower.jpg"):
            photos[name.removesuffix(".jpg")] = cv2.cvtColor(load_sample_image(name), cv2.COLOR_RGB2BGR)
    except ImportError:
        pass
    return photos


def edited_copies(image: np.ndarray) -> dict[str, np.ndarray]:
    """Copies a user might upload: cropped, mirrored, shrunk, darkened."""
    h, w = image.shape[:2]
    return {
        "crop": image[h // 10 : h - h // 10, w // 10 : w - w // 10],
        "mirror": cv2.flip(image, 1),
        "small": cv2.resize(image, (w // 3, h // 3), interpolation=cv2.INTER_AREA),
        "dark": cv2.convertScaleAbs(image, alpha=0.6, beta=0),
    }


def _jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def run_demo(target: str, out_dir: Path) -> Path | None:
    photos = sample_photos()
    if not photos:
        print("demo: no sample photos (install scikit-image or scikit-learn); skipping")
        return None
    with ImageSearchClient(target) as client:
        local = (
            LOCAL_FEATURES
            if LOCAL_FEATURES in {f.name for f in client.list_plugins().local_features}
            else None
        )
        existing = {c.name: c for c in client.list_collections()}
        if DEMO_COLLECTION in existing and local and not existing[DEMO_COLLECTION].local_features:
            client.delete_collection(DEMO_COLLECTION)  # made by an older version: re-index with SIFT features
            del existing[DEMO_COLLECTION]
        if DEMO_COLLECTION not in existing:
            client.create_collection(
                DEMO_COLLECTION, description="sample photos indexed by --demo", local_features=local
            )
            items = []
            for name, image in photos.items():
                items.append(ImageItem(id=name, content=_jpeg(image), label=name))
                for edit, copy in edited_copies(image).items():
                    if edit != "crop":  # the crop is kept back as the query
                        items.append(ImageItem(id=f"{name}-{edit}", content=_jpeg(copy), label=name))
            client.add_images(items, collection=DEMO_COLLECTION)
        query_name = "chelsea" if "chelsea" in photos else next(iter(photos))
        query = _jpeg(edited_copies(photos[query_name])["crop"], quality=40)
        result = client.search(image=query, top_k=8, collection=DEMO_COLLECTION)
        print(
            f"\ndemo: searched collection '{DEMO_COLLECTION}' with a cropped, JPEG-q40 copy of '{query_name}':"
        )
        print(f"  {'rank':>4}  {'id':<30} {'label':<22} {'score':>7}")
        for rank, hit in enumerate(result.hits, 1):
            print(f"  {rank:>4}  {hit.id:<30} {hit.label:<22} {hit.score:>7.4f}")
        timings = result.timings
        print(
            f"  decode {timings.decode_ms:.1f} ms, extract {timings.extract_ms:.1f} ms, "
            f"search {timings.search_ms:.1f} ms, total {timings.total_ms:.1f} ms"
        )
        sheet = render_contact_sheet(
            f"imagesearch demo: query '{query_name}' (cropped, JPEG q=40)",
            SheetItem("query", query),
            [
                SheetItem(
                    f"#{rank} {hit.id}",
                    client.get_image(hit.id, collection=DEMO_COLLECTION).thumbnail,
                    [f"label {hit.label}", f"score {hit.score:.4f}", f"distance {hit.distance:.4f}"],
                )
                for rank, hit in enumerate(result.hits, 1)
            ],
        )
        if local:
            _pasted_demo(client, photos)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo-results.html"
    path.write_text(sheet)
    print(f"  contact sheet: {path.resolve()}")
    return path


def _pasted_demo(client: ImageSearchClient, photos: dict[str, np.ndarray]) -> None:
    """A photo pasted at 40% into another: the first stage alone, then re-ranked by geometry."""
    names = sorted(photos)
    source = "coffee" if "coffee" in photos else names[0]
    background = next(name for name in ("astronaut", *names) if name in photos and name != source)
    canvas = cv2.resize(photos[background], (640, 480), interpolation=cv2.INTER_AREA)
    small = cv2.resize(photos[source], (256, 192), interpolation=cv2.INTER_AREA)
    canvas[240:432, 352:608] = small
    query = _jpeg(canvas)
    print(f"\ndemo: '{source}' pasted at 40% into '{background}', first stage only, then re-ranked:")
    plain = client.search(image=query, top_k=6, collection=DEMO_COLLECTION)
    ranked = client.search(image=query, top_k=6, collection=DEMO_COLLECTION, rerank=RERANK_DEPTH)
    print(f"  {'rank':>4}  {'first stage':<30} {'re-ranked by SIFT geometry':<30} {'inliers':>7}")
    for rank, (first, second) in enumerate(zip(plain.hits, ranked.hits, strict=False), 1):
        print(f"  {rank:>4}  {first.id:<30} {second.id:<30} {second.inliers:>7}")
    print(f"  re-ranking {RERANK_DEPTH} candidates took {ranked.timings.rerank_ms:.0f} ms")
