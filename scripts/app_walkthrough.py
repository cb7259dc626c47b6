"""Regenerates the README's App walkthrough screenshots from the real App in headless Chromium.

    python scripts/app_walkthrough.py [--out docs/images] [--port 5151]

It builds a throwaway dataset of generated scenes (``ntt_core.synthetic``) in its own private
database, runs the plugin's four steps through its operators (sample references -> build memory
bank -> segment with references -> evaluate segmentations) with the tiny random-weight models,
launches the App and photographs it: the grid (``app-walkthrough.png``), the operator browser
(``app-operators.png``), the segment form (``app-segment-form.png``), a refusal in the build
form (``app-build-refusal.png``) and the evaluation patches (``app-eval-patches.png``). Random
weights make the predicted masks meaningless; the pictures show the workflow, not the method's
quality.

It needs what the browser suite needs (``scripts/install.sh`` installs both): Debian's Chromium
and Playwright's Python client from ``requirements-dev.txt``, never ``playwright install``
(which downloads browsers).
"""

from __future__ import annotations

import argparse
import atexit
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ntt_operators import sandbox  # noqa: E402  (imports no fiftyone)

PLUGIN = "@ntt/no_time_to_train"
CLASSES = ("disc", "square", "triangle")
NUM_IMAGES = 12
IMAGE_SIZE = (240, 320)  # (H, W)
VIEWPORT = {"width": 1280, "height": 800}
MAX_BYTES = 400_000
OPERATOR_QUERY = "no_time_to_train"
COLORS = {"ground_truth": "#ffd400", "ntt_predictions": "#ff2d55"}


def log(message: str) -> None:
    print(f"[walkthrough] {message}", flush=True)


def make_dataset(work: Path):
    """Generated scenes with ``ground_truth`` instance masks, as a user would bring them."""
    import fiftyone as fo
    import numpy as np
    from PIL import Image

    from ntt_core.synthetic import make_scene

    rng = np.random.default_rng(11)
    folder = work / "images"
    folder.mkdir()
    samples = []
    for i in range(NUM_IMAGES):
        pixels, instances = make_scene(rng, *IMAGE_SIZE, CLASSES)
        path = folder / f"scene_{i:02d}.png"
        Image.fromarray(pixels).save(path)
        detections = [fo.Detection.from_mask(inst.mask, label=inst.label) for inst in instances]
        samples.append(
            fo.Sample(filepath=str(path), ground_truth=fo.Detections(detections=detections))
        )
    dataset = fo.Dataset("ntt-walkthrough")
    dataset.add_samples(samples)
    dataset.compute_metadata()
    return dataset


def run_operator(name: str, dataset, **params):
    """Runs one of the plugin's operators immediately, as the App's Execute button does."""
    import fiftyone.operators as foo

    log(f"{name} {params}")
    result = foo.execute_operator(
        f"{PLUGIN}/{name}", ctx={"view": dataset.view(), "params": params}
    )
    if result.error:
        raise RuntimeError(f"{name} failed: {result.error}")
    return result.result


def run_the_four_steps(dataset) -> str:
    from ntt_operators import api

    run_operator("sample_references", dataset, gt_field="ground_truth", shots=2, seed=33)
    run_operator(
        "build_memory_bank",
        dataset,
        gt_field="ground_truth",
        bank_name="bank_2shot",
        preset="tiny",
        weights="random",
        device="cpu",
    )
    run_operator(
        "segment_with_references", dataset, bank_name="bank_2shot", label_field="ntt_predictions"
    )
    status = api.segment_status(dataset, "ntt_predictions")
    log(f"segmented: {status}")
    run_operator(
        "evaluate_segmentations",
        dataset,
        pred_field="ntt_predictions",
        gt_field="ground_truth",
        eval_key="ntt_eval",
    )
    return "ntt_eval"


def save(page, path: Path) -> None:
    """A screenshot under MAX_BYTES: PNG, palette-reduced if the full-colour one is too big."""
    from PIL import Image

    page.mouse.move(4, VIEWPORT["height"] - 4)  # no tile under the pointer: no hover overlay
    page.wait_for_timeout(800)
    raw = page.screenshot(type="png")
    path.write_bytes(raw)
    image = Image.open(io.BytesIO(raw)).convert("RGB")
    for colors in (256, 128, 64, 32):  # the scenes' pixel noise compresses badly
        if path.stat().st_size <= MAX_BYTES:
            break
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    log(f"wrote {path} ({path.stat().st_size // 1000} KB)")


def click_if_there(page, text: str) -> None:
    target = page.get_by_text(text, exact=True)
    if target.count():
        target.first.click()
    else:
        log(f"WARNING: nothing labelled {text!r} to click")


def photograph(session, dataset, eval_key: str, url: str, out: Path, wait: float) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=sandbox.chromium_path(), headless=True, args=sandbox.CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(url, wait_until="load")
            page.wait_for_timeout(wait * 1000)
            click_if_there(page, "Dismiss")  # the "Explore Enterprise" pop-up
            page.wait_for_timeout(1000)
            save(page, out / "app-walkthrough.png")

            # The operator browser (backtick), filtered to the plugin's operators.
            page.mouse.click(VIEWPORT["width"] // 2, 70)  # focus the App, not a text field
            page.keyboard.press("Escape")
            page.keyboard.press("`")
            page.wait_for_timeout(1500)
            page.keyboard.type(OPERATOR_QUERY)
            page.wait_for_timeout(2000)
            save(page, out / "app-operators.png")
            text = page.inner_text("body")
            for label in ("Sample references", "Build memory bank", "Segment with references"):
                if label not in text:
                    log(f"WARNING: {label!r} not found in the operator browser")

            # Open the segment form: the bank, the output field and the Advanced section.
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)
            page.keyboard.press("`")
            page.wait_for_timeout(1000)
            page.keyboard.type("Segment with references")
            page.wait_for_timeout(1500)
            page.keyboard.press("Enter")
            page.wait_for_timeout(4000)
            # A new output field (the form refuses the existing one), then Ray, so the form
            # shows its settings, and scroll to the Advanced section.
            output = page.locator("input[value='ntt_predictions']").first
            output.fill("ntt_predictions_ray")
            output.press("Tab")
            page.wait_for_timeout(2500)
            click_if_there(page, "Ray")
            page.wait_for_timeout(2500)
            advanced = page.get_by_text("Execution backend", exact=True)
            if advanced.count():
                advanced.first.scroll_into_view_if_needed()
                page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
                page.mouse.wheel(0, 400)
                page.wait_for_timeout(1000)
            save(page, out / "app-segment-form.png")
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)

            # A refusal as the form shows it: the bank name is taken, Execute is disabled.
            page.keyboard.press("`")
            page.wait_for_timeout(1000)
            page.keyboard.type("Build memory bank")
            page.wait_for_timeout(1500)
            page.keyboard.press("Enter")
            page.get_by_text("Bank name", exact=True).first.wait_for(timeout=60_000)
            name = page.locator("input[value='ntt_bank']").first
            name.fill("bank_2shot")
            name.press("Tab")
            page.get_by_text("already exists", exact=False).first.wait_for(timeout=60_000)
            page.get_by_text("already exists", exact=False).first.scroll_into_view_if_needed()
            save(page, out / "app-build-refusal.png")
            page.keyboard.press("Escape")
            page.wait_for_timeout(500)

            # The evaluation patches: every TP/FP/FN in the grid.
            session.view = dataset.to_evaluation_patches(eval_key)
            page.wait_for_timeout(wait * 1000)
            save(page, out / "app-eval-patches.png")
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--port", type=int, default=5151)
    parser.add_argument("--wait", type=float, default=15, help="seconds for the App to render")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ntt-walkthrough-"))
    mongod = sandbox.isolate(work, ROOT, name="ntt-walkthrough")
    # Registered before fiftyone is imported, so these run after FiftyOne's own exit handlers
    # (which still talk to the database): stop our mongod, then delete the scratch folder.
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    atexit.register(mongod.wait, timeout=30)
    atexit.register(mongod.terminate)
    session = None
    try:
        import fiftyone as fo

        dataset = make_dataset(work)
        eval_key = run_the_four_steps(dataset)
        log(f"{dataset.count('ntt_predictions.detections')} predicted instances")
        if sandbox.wait_for_port(args.port, 0.5):
            log(f"port {args.port} is taken; using another")
            args.port = sandbox.free_port()
        colors = fo.ColorScheme(
            color_by="field",
            opacity=0.45,
            fields=[{"path": path, "fieldColor": color} for path, color in COLORS.items()],
        )
        session = fo.launch_app(
            dataset,
            port=args.port,
            address="127.0.0.1",
            remote=True,
            auto=False,
            color_scheme=colors,
        )
        url = f"http://127.0.0.1:{args.port}/"
        if not sandbox.wait_for_port(args.port, 60):
            raise RuntimeError(f"the App did not start on {url}")
        args.out.mkdir(parents=True, exist_ok=True)
        photograph(session, dataset, eval_key, url, args.out, args.wait)
    finally:
        if session is not None:
            session.close()  # stops the App server
    return 0


if __name__ == "__main__":
    sys.exit(main())
