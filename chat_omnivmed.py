"""Ask an OmniV-Med checkpoint about medical images, volumes and videos; the answer streams as it is generated.

    python chat_omnivmed.py --model DIR_OR_HUB_ID scan.nii.gz "Which side is the lesion on?"   # one question
    python chat_omnivmed.py --model DIR_OR_HUB_ID chest.png knee.dcm                         # a prompt loop on stdin
    python chat_omnivmed.py --model DIR dicom_series/ "Describe the findings" --prune-threshold 0.2 --max-new-tokens 256

FILE...: PNG / JPEG / TIFF / ... images, single DICOM files, NIfTI volumes (.nii, .nii.gz), DICOM series folders and
videos (MP4, AVI, MOV, WebM, MKV); the processor reads each (`media_omnivmed.load_media`) and decides its kind. When
the last argument is not an existing file or folder it is the question; otherwise questions are read from stdin, one
per line, and the conversation (with its media) is kept across turns ("exit", "quit" or end of input to stop).

The same model also works through transformers' pipeline for 2D images:
    pipe = pipeline("image-text-to-text", model=DIR, trust_remote_code=True)
    pipe(text=[{"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "text", "text": "..."}]}])
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omnivmed.configuration_omnivmed import PRUNE_STAGES
from omnivmed_tools import answer  # noqa: F401 (streamed generation, shared with app.py)
from omnivmed_tools import load_model as load  # the same Auto-class loading for every tool


def media_blocks(processor, files: list[str]) -> list[dict]:
    """Read every file once with the processor's settings; the block carries the loaded media (its kind decided by
    the file), so later turns do not read it again."""
    blocks = []
    for name in files:
        media = processor.image_processor.to_media(name)
        blocks.append({"type": media.kind, media.kind: media})
    return blocks


def describe(blocks: list[dict]) -> str:
    parts = []
    for block in blocks:
        media = block[block["type"]]
        frames = media.frames.shape[0]
        what = {"image": "image", "volume": f"volume, {frames} slices", "video": f"video, {frames} frames"}[media.kind]
        parts.append(f"{Path(media.source).name} ({what})")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--model", required=True, help="OmniV-Med folder or Hub id")
    parser.add_argument("inputs", nargs="+", metavar="FILE", help="media files, then the question (optional)")
    parser.add_argument("--prune-threshold", type=float, default=None,
                        help="token pruning threshold for volumes / videos (0 keeps every token; default: the model's)")
    parser.add_argument("--prune-stage", choices=PRUNE_STAGES, default=None,
                        help="where pruning happens: pre_encoder_reuse (kept patches only through the tower, "
                        "attending to their whole frame: our checkpoints' default), post_encoder (every patch through "
                        "the tower: converted checkpoints') or pre_encoder (kept patches seeing only kept patches); "
                        "default: the model's. Answering with another stage than the model was trained with may cost "
                        "accuracy (README, Token pruning)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--system", default=None, help="a system prompt instead of the template's default")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)

    files, question = list(args.inputs), None
    if not Path(files[-1]).exists():
        question = files.pop()
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        parser.error(f"no such file or folder: {', '.join(missing)}")
    if not files and question is None:
        parser.error("give at least one file or a question")

    model, processor = load(args.model, args.device, args.dtype, args.prune_stage)
    try:
        blocks = media_blocks(processor, files)
    except ValueError as error:  # MediaError: names the file and what is wrong with it
        parser.exit(2, f"error: {error}\n")
    if blocks:
        print(f"[{describe(blocks)}]", file=sys.stderr, flush=True)
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]

    def ask(text: str):
        content = [{"type": "text", "text": text}]
        if not any(m["role"] == "user" for m in messages):
            content = blocks + content  # the media go with the first question
        messages.append({"role": "user", "content": content})
        try:
            reply = answer(model, processor, messages, args.max_new_tokens, args.prune_threshold)
        except ValueError as error:  # e.g. a conversation grown past the model's length: say so, keep the session
            messages.pop()
            print(f"error: {error}", file=sys.stderr, flush=True)
            return False
        messages.append({"role": "assistant", "content": reply})
        return True

    if question is not None:
        if not ask(question):
            raise SystemExit(2)
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if text.lower() in ("exit", "quit"):
            break
        if text:
            ask(text)


if __name__ == "__main__":
    main()
