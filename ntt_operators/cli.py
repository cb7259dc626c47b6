"""The ``ntt`` command line: the paper's COCO benchmark, and the plugin's steps from a shell.

``ntt reproduce`` runs the whole few-shot COCO protocol; ``sample``, ``build-bank``,
``update-bank``, ``segment``, ``evaluate`` and ``banks`` are thin wrappers over
``ntt_operators.api`` for any FiftyOne dataset; ``app`` opens the FiftyOne App with scheduling
enabled. Long steps draw their progress on stderr (``terminal.StepProgress``) and end with a
readable summary on stdout. Input errors print one line to stderr and exit with code 2, like
argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ntt_core.coco import format_paper_table
from ntt_core.config import NTTConfig
from ntt_core.errors import NTTError
from ntt_core.fewshot import split_classes
from ntt_operators import terminal

if TYPE_CHECKING:
    import fiftyone as fo

    from ntt_operators.coco_protocol import ReproduceReport, ReproduceSettings

Subcommands = argparse._SubParsersAction  # argparse's only handle on add_subparsers' result
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
# Flags that map one-to-one onto NTTConfig fields (dest name == field name).
_CONFIG_FLAGS = (
    ("--sam-model", str, "SAM2 registry name (e.g. sam2_hiera_large) or local checkpoint path"),
    ("--encoder-model", str, "DINOv2 registry name (e.g. dinov2_vitl14) or local .pth path"),
    ("--weights", str, "'official' checkpoints, or 'random' (untrained: plumbing checks only)"),
    ("--device", str, "auto, cpu, cuda or cuda:N"),
    ("--precision", str, "fp32, bf16 or fp16 (GPU only)"),
    ("--points-per-side", int, "prompt grid side (the paper: 32)"),
    ("--points-per-batch", int, "prompts per mask-decoder call (memory only)"),
    ("--sam-image-size", int, "SAM2 input side (the paper: 1024)"),
    ("--encoder-image-size", int, "DINOv2 input side (the paper: 518)"),
)
SCHEDULING_ENV = "FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS"
RANDOM_WEIGHTS_WARNING = (
    "!" * 88 + "\n"
    "!!! WARNING: --weights random: the models are UNTRAINED. This run only checks the\n"
    "!!! plumbing; the numbers below MEAN NOTHING and must not be reported.\n" + "!" * 88
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        terminal.silence_known_noise()
    try:
        return args.handler(args)
    except (NTTError, ValueError) as error:
        print(f"ntt: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except Exception as error:
        if not _database_unreachable(error):
            raise
        detail = " ".join(str(error).split()) or type(error).__name__
        print(f"ntt: error: {DATABASE_UNREACHABLE} ({detail})", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        print("ntt: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


DATABASE_UNREACHABLE = (
    "FiftyOne's database (MongoDB) cannot be reached: run MongoDB 6.0 or later and "
    "`export FIFTYONE_DATABASE_URI=mongodb://HOST:27017`, or install a mongod that runs here "
    "(README, Installing)"
)


def _database_unreachable(error: Exception) -> bool:
    """Whether FiftyOne failed to start or reach its database (no mongod, a dead URI)."""
    if "fiftyone" not in sys.modules:
        return False
    from fiftyone.core.config import FiftyOneConfigError
    from fiftyone.core.service import ServiceException

    return isinstance(error, (FiftyOneConfigError, ServiceException, ConnectionError))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntt",
        description="No Time to Train! (arXiv 2507.02798): training-free reference-based "
        "instance segmentation with SAM2 + DINOv2, on FiftyOne datasets.",
    )
    _add_verbose_flag(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reproduce(commands)
    _add_sample(commands)
    _add_build_bank(commands)
    _add_update_bank(commands)
    _add_segment(commands)
    _add_evaluate(commands)
    _add_banks(commands)
    _add_app(commands)
    for command in _subcommand_parsers(commands):
        # SUPPRESS: a subcommand's default must not undo `ntt --verbose COMMAND`.
        _add_verbose_flag(command, default=argparse.SUPPRESS)
    return parser


def _add_verbose_flag(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=default,
        help="also show third-party notices and warnings hidden by default",
    )


def _subcommand_parsers(commands: Subcommands) -> Iterator[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (``banks list``) included."""
    for parser in commands.choices.values():
        yield parser
        for action in parser._actions:
            if isinstance(action, Subcommands):
                yield from _subcommand_parsers(action)


# -- shared options ---------------------------------------------------------------------------


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model settings (defaults: the paper's)")
    group.add_argument(
        "--tiny",
        action="store_true",
        help="start from NTTConfig.tiny(): SAM2.1 hiera-tiny + DINOv2 ViT-S/14 at small sizes",
    )
    for flag, kind, text in _CONFIG_FLAGS:
        group.add_argument(flag, type=kind, default=None, help=text)


def _add_backend_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("execution backend")
    group.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="'local': this process; 'ray': Ray Data actors (needs pip install .[ray])",
    )
    group.add_argument(
        "--ray-address",
        default=None,
        help="an existing Ray cluster ('auto', 'ray://host:10001'); default: start a local one",
    )
    group.add_argument(
        "--num-actors", type=int, default=2, help="Ray actors (model replicas, one per GPU)"
    )
    group.add_argument(
        "--gpus-per-actor",
        type=float,
        default=None,
        help="default: 1 when the device is CUDA (or auto on a cluster with GPUs), else 0",
    )


def _backend_kwargs(args: argparse.Namespace) -> dict:
    return {
        "backend": args.backend,
        "ray_address": args.ray_address,
        "num_actors": args.num_actors,
        "gpus_per_actor": args.gpus_per_actor,
    }


def config_from_args(args: argparse.Namespace, base: NTTConfig | None = None) -> NTTConfig | None:
    """``base`` (or the paper's config) changed by the flags given; None when none was given."""
    changes = {}
    for flag, _, _ in _CONFIG_FLAGS:
        name = flag[2:].replace("-", "_")
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.tiny:
        return NTTConfig.tiny(**changes)
    if not changes:
        return None
    return (base or NTTConfig()).replace(**changes)


def _classes(text: str | None) -> list[str] | None:
    return None if text is None else [c.strip() for c in text.split(",") if c.strip()]


def _load_dataset(name: str) -> fo.Dataset:
    import fiftyone as fo  # imported late: `ntt --help` should not start a database

    if not fo.dataset_exists(name):
        raise ValueError(f"FiftyOne dataset {name!r} does not exist; see `fiftyone datasets list`")
    return fo.load_dataset(name)


def _api():
    from ntt_operators import api

    return api


# -- reproduce --------------------------------------------------------------------------------


def _add_reproduce(commands: Subcommands) -> None:
    p = commands.add_parser(
        "reproduce",
        help="the paper's COCO few-shot benchmark, end to end",
        description="Samples N-shot references from COCO train2017 exactly as the paper does, "
        "imports them and val2017 into FiftyOne, builds the memory bank, segments val2017 and "
        "prints pycocotools' bbox/segm results for the split's classes, plus FiftyOne's mAP.",
    )
    p.add_argument(
        "--coco-root",
        type=Path,
        required=True,
        help="holds train2017/, val2017/, annotations/instances_{train,val}2017.json",
    )
    p.add_argument("--shots", type=int, default=30)
    p.add_argument("--seed", type=int, default=33)
    p.add_argument(
        "--split", choices=("few_shot_classes", "all_classes"), default="few_shot_classes"
    )
    p.add_argument(
        "--classes",
        help="comma-separated class names replacing the split's (for COCO-format data of your own)",
    )
    p.add_argument("--max-samples", type=int, help="only the first N val2017 images")
    p.add_argument("--dataset-name", help="FiftyOne dataset (default: ntt-coco2017[-valN])")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep an existing bank and skip images already segmented",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--no-download",
        dest="download",
        action="store_false",
        help="never download; stop at the first missing file",
    )
    p.add_argument("--coco-url", default=None, help="a mirror of http://images.cocodataset.org")
    _add_config_flags(p)
    _add_backend_flags(p)
    p.set_defaults(handler=_reproduce)


def _reproduce(args: argparse.Namespace) -> int:
    from ntt_operators.coco_protocol import COCO_URL, ReproduceSettings, reproduce

    config = config_from_args(args) or NTTConfig()
    settings = ReproduceSettings(
        coco_root=args.coco_root,
        shots=args.shots,
        seed=args.seed,
        classes=_classes(args.classes) or split_classes(args.split),
        split=args.split if args.classes is None else "custom",
        config=config,
        max_samples=args.max_samples,
        dataset_name=args.dataset_name,
        download=args.download,
        base_url=args.coco_url or COCO_URL,
        resume=args.resume,
        batch_size=args.batch_size,
        **_backend_kwargs(args),
    )
    untrained = config.weights == "random"
    if untrained:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    with terminal.StepProgress() as progress:
        report = reproduce(settings, log=progress.log, progress=progress)
    _print_report(report, settings, untrained, progress)
    return 0


def _print_report(
    report: ReproduceReport,
    settings: ReproduceSettings,
    untrained: bool,
    progress: terminal.StepProgress,
) -> None:
    if untrained:
        print(RANDOM_WEIGHTS_WARNING)
    print(
        f"COCO few-shot: {settings.split} ({len(settings.classes)} classes), "
        f"{settings.shots} shots, seed {settings.seed}; {report.num_images} val2017 images, "
        f"{report.num_predictions} predictions in {report.dataset!r}.{report.label_field}; "
        f"{terminal.format_duration(progress.elapsed())} in all"
    )
    print(segmentation_summary(report.segmentation, report.segmentation_seconds) + "\n")
    print(format_paper_table(report.stats))
    print(
        f"\nFiftyOne mAP (segm, masks; eval key {report.eval_key!r}): {report.fiftyone_map:.3f}"
        "\n(FiftyOne ignores COCO's crowd rule for masks, so it can read a little below "
        "pycocotools.)"
    )
    if untrained:
        print(RANDOM_WEIGHTS_WARNING)


# -- the plugin's steps -----------------------------------------------------------------------


def _add_dataset_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, help="FiftyOne dataset name")


def _add_sample(commands: Subcommands) -> None:
    p = commands.add_parser("sample", help="tag N-shot references per class (paper's protocol)")
    _add_dataset_flag(p)
    p.add_argument("--gt-field", required=True, help="Detections field with instance masks")
    p.add_argument("--shots", type=int, required=True)
    p.add_argument("--seed", type=int, default=33)
    p.add_argument("--tag", default="reference")
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument(
        "--replace-tags",
        action="store_true",
        help="also untag labels/samples that carry the tag but were tagged by hand",
    )
    p.set_defaults(handler=_sample)


def _sample(args: argparse.Namespace) -> int:
    picks = _api().sample_references(
        _load_dataset(args.dataset),
        args.gt_field,
        args.shots,
        seed=args.seed,
        tag=args.tag,
        classes=_classes(args.classes),
        replace_tags=args.replace_tags,
    )
    for label, ids in picks.items():
        print(f"{label}: {len(ids)} references")
    print(f"tagged {sum(map(len, picks.values()))} instances {args.tag!r}")
    return 0


def _add_build_bank(commands: Subcommands) -> None:
    p = commands.add_parser("build-bank", help="encode tagged references into a memory bank")
    _add_dataset_flag(p)
    p.add_argument(
        "--gt-field",
        required=True,
        help="reference field(s), comma-separated (e.g. ground_truth,ntt_predictions to accept "
        "predictions tagged as references)",
    )
    p.add_argument("--bank", required=True, help="memory bank name")
    p.add_argument("--ref-tag", default="reference")
    p.add_argument(
        "--negative-tag",
        default="negative",
        help="labels with this tag, in any Detections field, become negatives ('' for none)",
    )
    p.add_argument("--tag-type", choices=("label", "sample"), default="label")
    p.add_argument("--classes", help="comma-separated class names (default: all tagged)")
    _add_config_flags(p)
    p.set_defaults(handler=_build_bank)


def _build_bank(args: argparse.Namespace) -> int:
    with terminal.StepProgress() as progress:
        bank = _api().build_memory_bank(
            _load_dataset(args.dataset),
            _classes(args.gt_field),
            args.bank,
            ref_tag=args.ref_tag,
            negative_tag=args.negative_tag or None,
            tag_type=args.tag_type,
            classes=_classes(args.classes),
            config=config_from_args(args),
            progress=progress,
        )
    per_class = ", ".join(f"{name} {n}" for name, n in bank.references_per_class.items())
    negatives = (
        f", {terminal.plural(len(bank.negative_ids), 'negative')}" if bank.negative_ids else ""
    )
    print(
        f"Built memory bank {args.bank!r} in {terminal.format_duration(progress.elapsed())}: "
        f"{terminal.plural(len(bank), 'reference')} of {len(bank.classes)} "
        f"{'class' if len(bank.classes) == 1 else 'classes'} ({per_class}){negatives}."
    )
    return 0


def _add_update_bank(commands: Subcommands) -> None:
    p = commands.add_parser(
        "update-bank",
        help="add newly tagged references/negatives to a bank, drop untagged ones",
        description="Re-reads the fields and tags the bank was built from, over the whole "
        "dataset, and encodes only the labels that are new to it.",
    )
    _add_dataset_flag(p)
    p.add_argument("--bank", required=True, help="memory bank name")
    p.set_defaults(handler=_update_bank)


def _update_bank(args: argparse.Namespace) -> int:
    with terminal.StepProgress() as progress:
        summary = _api().update_memory_bank(
            _load_dataset(args.dataset), args.bank, progress=progress
        )
    changes = ", ".join(
        f"{len(summary[key])} {key.replace('_', ' ')}"
        for key in ("added", "removed", "re_encoded", "kept_vanished")
    )
    print(
        f"Updated memory bank {args.bank!r} in {terminal.format_duration(progress.elapsed())}: "
        f"{changes}; now {terminal.plural(summary['references'], 'reference')} and "
        f"{terminal.plural(summary['negatives'], 'negative')}."
    )
    return 0


def _add_segment(commands: Subcommands) -> None:
    p = commands.add_parser("segment", help="segment a dataset with a memory bank")
    _add_dataset_flag(p)
    p.add_argument("--bank", required=True)
    p.add_argument("--label-field", default="ntt")
    p.add_argument("--ref-tag", default="reference", help="samples with this tag are skipped")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--skip-done", action="store_true")
    p.add_argument(
        "--rescore",
        action="store_true",
        help="update this plugin's existing field in place (keeps prediction ids and tags)",
    )
    p.add_argument(
        "--reuse-proposals",
        action="store_true",
        help="cache SAM2 proposals per image and re-score them with later banks",
    )
    p.add_argument("--batch-size", type=int, default=16)
    _add_config_flags(p)
    _add_backend_flags(p)
    p.set_defaults(handler=_segment)


def _segment(args: argparse.Namespace) -> int:
    api, dataset = _api(), _load_dataset(args.dataset)
    from ntt_operators.api.request import RayOptions, SegmentMode, SegmentRequest

    # Flags adjust the bank's own settings: a bank only matches the encoder it was built with.
    recorded = NTTConfig.from_dict(api.memory_bank_config(dataset, args.bank)["ntt_config"])
    request = SegmentRequest(
        dataset,
        args.bank,
        args.label_field,
        mode=SegmentMode.from_flags(args.overwrite, args.skip_done, args.rescore),
        reuse_proposals=args.reuse_proposals,
        backend=args.backend,
        ray=RayOptions(args.ray_address, args.num_actors, args.gpus_per_actor),
        exclude_tag=args.ref_tag,
        config=config_from_args(args, recorded),
        batch_size=args.batch_size,
    )
    with terminal.StepProgress() as progress:
        summary = api.segment(
            dataset, args.bank, args.label_field, progress=progress, **request.segment_kwargs()
        )
    print(segmentation_summary(summary, progress.elapsed()))
    return 0


def segmentation_summary(summary: Mapping, seconds: float) -> str:
    """``api.segment``'s summary for a reader: counts, time and speed, the failures.

    The speed is over the whole call, model loading included: never better than the truth, and
    right for Ray too, whose results can arrive all at once at the end.
    """
    processed, failed = summary["processed"], summary["failed"]
    line = (
        f"Segmented {terminal.plural(processed, 'sample')} into {summary['label_field']!r} "
        f"in {terminal.format_duration(seconds)}"
    )
    if processed + len(failed) and seconds > 0:
        line += f" ({terminal.format_rate((processed + len(failed)) / seconds, 'samples')})"
    lines = [f"{line}: {terminal.plural(summary['instances'], 'instance')}."]
    if summary["skipped"]:
        lines.append(f"Skipped {terminal.plural(summary['skipped'], 'sample')} already done.")
    if summary.get("models_loaded") is False:
        lines.append("No model ran: every target was re-scored from cached proposals.")
    if summary.get("unchanged"):
        lines.append(
            f"Re-scored in place: {terminal.plural(summary['written'], 'sample')} changed and "
            f"written, {summary['unchanged']} unchanged."
        )
    if summary.get("deleted_evaluations"):
        lines.append(
            "Deleted the evaluations of the old predictions: "
            + ", ".join(summary["deleted_evaluations"])
        )
    if failed:
        verb = "was" if len(failed) == 1 else "were"
        lines.append(f"{terminal.plural(len(failed), 'sample')} failed and {verb} left empty:")
        lines += terminal.format_failures(failed, "sample")
        if len(failed) > terminal.FAILURES_SHOWN:
            lines.append(
                "  (all of them: api.segment_status(dataset, "
                f"{summary['label_field']!r})['failed'] in Python)"
            )
    return "\n".join(lines)


def _add_evaluate(commands: Subcommands) -> None:
    p = commands.add_parser("evaluate", help="FiftyOne COCO-style mask evaluation")
    _add_dataset_flag(p)
    p.add_argument("--pred-field", required=True)
    p.add_argument("--gt-field", required=True)
    p.add_argument("--eval-key", required=True)
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    classes = _classes(args.classes)
    results = _api().evaluate(
        _load_dataset(args.dataset),
        args.pred_field,
        args.gt_field,
        args.eval_key,
        classes=classes,
    )
    report = _api().class_report(results)
    if report["mAP"] is not None:
        print(f"mAP: {results.mAP(classes=classes):.3f}")
    for sentence in (report.get("no_ground_truth"), report.get("note")):
        if sentence:
            print(sentence)
    return 0


def _add_banks(commands: Subcommands) -> None:
    p = commands.add_parser("banks", help="list, inspect or delete a dataset's memory banks")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="the dataset's memory banks")
    _add_dataset_flag(listing)
    listing.set_defaults(handler=_banks_list)
    for name, handler in (("info", _banks_info), ("delete", _banks_delete)):
        action = actions.add_parser(name, help=f"{name} one memory bank")
        _add_dataset_flag(action)
        action.add_argument("--bank", required=True)
        action.set_defaults(handler=handler)


def _banks_list(args: argparse.Namespace) -> int:
    for name in _api().list_memory_banks(_load_dataset(args.dataset)):
        print(name)
    return 0


def _banks_info(args: argparse.Namespace) -> int:
    info = _api().memory_bank_info(_load_dataset(args.dataset), args.bank)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _banks_delete(args: argparse.Namespace) -> int:
    _api().delete_memory_bank(_load_dataset(args.dataset), args.bank)
    print(f"deleted memory bank {args.bank!r}")
    return 0


# -- the App ----------------------------------------------------------------------------------


def _add_app(commands: Subcommands) -> None:
    p = commands.add_parser(
        "app",
        help="open the FiftyOne App on a dataset, with scheduling enabled",
        description=f"Serves the FiftyOne App on a dataset with {SCHEDULING_ENV}=true, so that "
        "the plugin's forms offer Schedule (delegated execution) next to Execute; prints the "
        "URL and how to run the queue, and serves until Ctrl-C.",
    )
    _add_dataset_flag(p)
    p.add_argument("--port", type=int, default=None, help="default: FiftyOne's (5151)")
    p.add_argument(
        "--address",
        default=None,
        help="interface to serve on (default: FiftyOne's, localhost; 0.0.0.0: all)",
    )
    p.set_defaults(handler=_app)


def _app(args: argparse.Namespace) -> int:
    # The App server reads it when it starts (it inherits this environment); without it the
    # forms' Schedule option says "NOT AVAILABLE".
    os.environ[SCHEDULING_ENV] = "true"
    import fiftyone as fo

    dataset = _load_dataset(args.dataset)
    port = args.port or fo.config.default_app_port
    # Given to FiftyOne always: without one, it binds every interface when it thinks it runs
    # in a container, serving the dataset to the network unasked.
    address = args.address or fo.config.default_app_address or "localhost"
    if _port_in_use(address, port):
        # FiftyOne would attach to a server already there, which may not allow scheduling.
        raise ValueError(f"port {port} is already in use (another App?); pass --port N")
    session = fo.launch_app(dataset, port=port, address=address, remote=True)
    print(
        f"\nThe FiftyOne App serves dataset {dataset.name!r} at {_served_at(address, port)}\n"
        "Scheduling is on: in a form, Execute > Schedule queues the run. Run the queue from "
        "another shell\n(same environment) with\n\n    fiftyone delegated launch\n\n"
        "and follow scheduled runs with `fiftyone delegated list` and "
        "`fiftyone delegated info ID`.\nPress Ctrl-C to stop the App.",
        flush=True,
    )
    try:
        session.wait(-1)
    except KeyboardInterrupt:
        session.close()
    print("App stopped.")
    return 0


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _served_at(address: str, port: int) -> str:
    """Where the App listens, as the user should read it."""
    if address in ("0.0.0.0", "::"):
        return f"http://{socket.gethostname()}:{port}/ (every network interface of this machine)"
    reach = " (only from this machine)" if address in LOOPBACK else ""
    return f"http://{address}:{port}/{reach}"


def _port_in_use(address: str, port: int) -> bool:
    host = "127.0.0.1" if address in ("0.0.0.0", "", "localhost") else address
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex((host, port)) == 0


if __name__ == "__main__":
    sys.exit(main())
