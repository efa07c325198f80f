"""The command line: ``prefopt <verb> [CONFIG.yaml | --config CONFIG.yaml] [key.sub=value ...]``.

Verbs:
  sft      supervised fine-tuning (loss defaults to sft)
  dpo      preference optimisation (loss defaults to dpo; any registered loss works)
  rm       a Bradley-Terry reward model (sequence classifier); accuracy and calibration table
  generate sample completions from model.name_or_path for generate.prompts (or data.train);
           writes OUTPUT_DIR/generations.jsonl
  spin     SPIN rounds (sample, pair with the data's response, train); OUTPUT_DIR/iter-N/
  iterative  iterative / self-rewarding DPO rounds (sample k, judge, pair, train)
  stepwise sDPO: train on ordered chunks, each against the previous step's model
  eval     preference metrics of model.name_or_path against reference.name_or_path on
           data.eval (or data.train); writes OUTPUT_DIR/eval.json; no training
  experiment  built-in experiments: `prefopt experiment sentiment` (the DPO paper's reward-vs-KL task)
  report   OUTPUT_DIR/report.html from a run's outputs (plots, metrics, data, samples)
  demo     the end-to-end demo on built-in data (tokenizer, tiny Llama, SFT, DPO, table)
  losses   every registered loss: paper, parameters, requirements (`prefopt losses dpo`)
  keys     every config key with its type, default and help
  formats  the data formats and how they are detected

Errors caused by input (config, data) print one clear message and exit with status 2; the
exit statuses are listed in EPILOG (`prefopt --help`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from prefopt.errors import PrefoptError

# The verbs that take a config and overrides.
RUN_VERBS = ("sft", "dpo", "rm", "eval", "generate", "spin", "iterative", "stepwise")

EPILOG = """\
config and overrides (sft, dpo, rm, eval, generate, spin, iterative, stepwise):
  prefopt dpo CONFIG.yaml train.learning_rate=1e-5 loss.beta=0.2
  prefopt dpo --config CONFIG.yaml --learning_rate 1e-5 --beta=0.2 --train.max_steps 3
  The config file is optional. Overrides are YAML values, written key=value, --key=value or
  --key value (a bare --key is key=true). A flat TRL name goes to its key: learning_rate to
  train.learning_rate, beta to loss.beta (a parameter of the single loss). `prefopt keys`
  lists every key.

exit status:
  0    success
  1    the run failed: its loss stayed non-finite (a checkpoint is saved), the demo's
       check failed, or an unexpected error (a bug: the traceback is printed)
  2    usage, config or data error (one message naming the key, file:line or record)
  130  interrupted by SIGINT (Ctrl-C); a training run saves a checkpoint first
       (continue with train.resume_from=latest)
  143  stopped by SIGTERM, likewise (any signal N: 128 + N)
  141  stdout closed by its reader (`prefopt losses | head`), quietly
"""


class UsageError(Exception):
    """A command line that cannot be read (exit status 2, with the verb's usage)."""


def main(argv: list[str] | None = None) -> int:
    from prefopt import __version__

    parser = argparse.ArgumentParser(prog="prefopt", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"prefopt {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    run_parsers = {}
    for verb, text in (("sft", "supervised fine-tuning"), ("dpo", "preference optimisation"),
                       ("rm", "train a reward model"),
                       ("eval", "evaluate a model against a reference (no training)"),
                       ("generate", "sample completions from a model (JSONL)"),
                       ("spin", "SPIN: self-play fine-tuning rounds"),
                       ("iterative", "iterative / self-rewarding DPO rounds"),
                       ("stepwise", "sDPO: stepwise DPO over ordered chunks")):
        p = run_parsers[verb] = verbs.add_parser(verb, help=text, epilog=EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="CONFIG.yaml", help="the YAML config (or give it first, without --config)")
        p.add_argument("args", nargs="*", metavar="CONFIG.yaml | key=value | --key value",
                       help="an optional YAML config, then overrides such as train.learning_rate=1e-5, "
                            "--train.max_steps=3 or a flat TRL name: --learning_rate 1e-5")
    experiment = verbs.add_parser("experiment", help="run a built-in experiment (sentiment)")
    experiment.add_argument("name", choices=["sentiment"])
    experiment.add_argument("--output-dir", default="runs/sentiment")
    experiment.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    experiment.add_argument("--seed", type=int, default=0)
    report = verbs.add_parser("report", help="write OUTPUT_DIR/report.html from a run's outputs")
    report.add_argument("output_dir", metavar="OUTPUT_DIR")
    demo = verbs.add_parser("demo", help="SFT then DPO on built-in data with a tiny Llama; prints a table")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    losses = verbs.add_parser("losses", help="list the registered losses")
    losses.add_argument("name", nargs="?", help="show one loss in detail")
    losses.add_argument("--markdown", action="store_true", help="the README's table of losses")
    verbs.add_parser("keys", help="list every config key")
    verbs.add_parser("formats", help="list the data formats")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in RUN_VERBS and not {"-h", "--help"} & set(argv[1:]):
        # argparse would split `--learning_rate 1e-5 X.yaml` wrongly: the run verbs read their own arguments
        ns = argparse.Namespace(verb=argv[0])
        try:
            ns.config, ns.args = run_arguments(argv[1:])
        except UsageError as e:
            run_parsers[ns.verb].error(str(e))
    else:
        ns = parser.parse_args(argv)
    from prefopt.train.loop import Interrupted, NonFiniteLossError

    try:
        return VERBS[ns.verb](ns)
    except BrokenPipeError:  # `prefopt losses | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Interrupted as e:  # a checkpoint was saved: exit as a process stopped by that signal would
        print(f"prefopt {ns.verb}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (loading, tokenising): nothing to save
        print(f"prefopt {ns.verb}: interrupted", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:  # the run failed, not its input
        print(f"prefopt {ns.verb}: error: {e}", file=sys.stderr)
        return 1
    except PrefoptError as e:
        print(f"prefopt {ns.verb}: error: {e}", file=sys.stderr)
        return 2


def run_arguments(tokens: list[str]) -> tuple[str | None, list[str]]:
    """(config file, overrides) of a run verb: the config given first (or anywhere) without
    ``=``, or as ``--config X`` / ``--config=X``; overrides as ``key=value``, ``--key=value``,
    ``--key value`` (a value may start with one dash: ``--max_steps -1``) or a bare ``--key``
    (``key=true``, as TRL's parser reads a flag; a YAML file after it is the config, not its value)."""
    config, positional, overrides, i = None, None, [], 0
    while i < len(tokens):
        token = tokens[i]
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            if not eq:
                following = tokens[i + 1] if i + 1 < len(tokens) else None
                config_file = following is not None and name != "config" and "=" not in following \
                    and following.endswith((".yaml", ".yml"))  # `--use_peft cfg.yaml`: a flag, then the config
                if following is not None and not following.startswith("--") and not config_file:
                    value, i = tokens[i + 1], i + 1
                elif name == "config":
                    raise UsageError("--config needs a file: --config CONFIG.yaml")
                else:
                    value = "true"
            if name == "config":
                if config is not None:
                    raise UsageError(f"--config given twice: '{config}' and '{value}'")
                config = value
            else:
                overrides.append(f"{name}={value}")
        elif "=" in token:
            overrides.append(token)
        elif token.startswith("-"):
            raise UsageError(f"unrecognized argument '{token}' (overrides are key=value or --key value)")
        elif positional is None:
            positional = token
        else:
            raise UsageError(f"two config files, '{positional}' and '{token}' (overrides are key=value)")
        i += 1
    if config is not None and positional is not None:
        raise UsageError(f"the config is given twice: '{positional}' and --config '{config}'; give one")
    return config if config is not None else positional, overrides


def _config(ns, defaults: dict):
    from prefopt.config import load_config

    return load_config(ns.config, ns.args, defaults=defaults)


def cmd_train(ns) -> int:
    from prefopt.trainer import Trainer

    defaults = {"loss": "sft", "train": {"learning_rate": 2e-5}} if ns.verb == "sft" else {"loss": "dpo"}
    config = _config(ns, defaults)
    trainer = Trainer.from_config(config)
    trainer.train()
    print(f"saved {Path(config.output_dir) / 'final'}")
    if trainer.final_eval:
        print(json.dumps(trainer.final_eval, indent=2))
    return 0


def cmd_eval(ns) -> int:
    from prefopt.errors import ConfigError
    from prefopt.objective import Objective
    from prefopt.trainer import Trainer

    config = _config(ns, {"loss": "dpo"})
    sampled = None
    if config.eval.generate:
        from prefopt.eval.run import run_sampled_eval
        sampled = run_sampled_eval(config)
        print((Path(config.output_dir) / "reward_kl.md").read_text())
        if config.eval.sweep or (config.data.eval is None and config.data.train is None):
            print(f"wrote {Path(config.output_dir) / 'sampled_eval.json'}")
            return 0  # no preference data (or several models): the sampled metrics only
    needed, needed_by = Objective.requirements(config.loss)
    if needed and config.reference.name_or_path is None:
        raise ConfigError(f"{needed_by} compares the model with a reference; set "
                          f"reference.name_or_path (a copy of the evaluated model would give zero rewards)")
    source = config.data.eval or config.data.train
    if source is None and not config.data.eval_split_size:
        raise ConfigError("set data.eval (or data.train)")
    if config.data.eval is None and config.data.eval_split_size:
        source = None  # evaluate on the held-out split of data.train
    else:
        config.data.train, config.data.eval = None, source
    trainer = Trainer.from_config(config)
    values = trainer.evaluate(metric_key_prefix="eval/")  # the names of metrics.jsonl
    out = Path(config.output_dir) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"model": config.model.name_or_path, "reference": config.reference.name_or_path,
              "data": str(source if source is not None else f"{config.data.train} (held-out split)"),
              "loss": [t.name for t in config.loss], "metrics": values}
    if sampled is not None:
        result["sampled"] = sampled["models"][0]
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(values, indent=2))
    print(f"wrote {out}")
    return 0


def cmd_rm(ns) -> int:
    from prefopt.rewards import calibration_markdown
    from prefopt.trainer import RewardTrainer

    config = _config(ns, {"loss": "bradley_terry", "train": {"learning_rate": 1e-5}})
    trainer = RewardTrainer(args=config)
    trainer.train()
    on = "eval" if trainer._eval_set is not None else "train"
    result = {"data": on, **trainer.calibration(on)}
    out = Path(config.output_dir)
    if trainer.job.accelerator.is_main_process:
        (out / "reward_calibration.json").write_text(json.dumps(result, indent=2))
        (out / "reward_calibration.md").write_text(calibration_markdown(result))
        print(f"saved {out / 'final'} (loads with AutoModelForSequenceClassification)")
        print(f"{on} pairs: " + calibration_markdown(result))
    return 0


def cmd_generate(ns) -> int:
    from prefopt.generate import run_generate

    result = run_generate(_config(ns, {}))
    print(f"wrote {result['output']}")
    return 0


def cmd_method(ns) -> int:
    from prefopt.methods import METHODS

    run, default_loss = METHODS[ns.verb]
    result = run(_config(ns, {"loss": default_loss}))
    print(f"final model: {result['final_model']}")
    return 0


def cmd_experiment(ns) -> int:
    from prefopt.experiments.sentiment import run_sentiment

    result = run_sentiment(ns.output_dir, quick=ns.quick, seed=ns.seed)
    print((Path(ns.output_dir) / "frontier.md").read_text())
    print(f"wrote {Path(ns.output_dir) / 'frontier.png'} ({sum(result['timings_s'].values()):.0f} s)")
    return 0


def cmd_report(ns) -> int:
    from prefopt.report import write_report

    print(f"wrote {write_report(ns.output_dir)}")
    return 0


def cmd_demo(ns) -> int:
    from prefopt.demo import run_demo

    return 0 if run_demo(ns.output_dir, quick=ns.quick) else 1


def cmd_losses(ns) -> int:
    from prefopt.losses import get_spec, list_specs

    if ns.markdown:
        print(losses_markdown())
        return 0
    if ns.name:
        try:
            spec = get_spec(ns.name)
        except KeyError as e:
            from prefopt.errors import ConfigError
            raise ConfigError(e.args[0]) from None
        print(f"{spec.name}{' (aliases: ' + ', '.join(spec.aliases) + ')' if spec.aliases else ''}")
        print(f"  loss:   {spec.equation}")
        print(f"  paper:  {spec.paper}")
        print(f"  needs:  {spec.needs_text()}")
        print(f"  use:    {spec.summary}")
        for name, default, text in spec.param_docs():
            print(f"  {name} = {default!r}: {text}")
        return 0
    for spec in list_specs():
        params = ", ".join(f"{n}={d!r}" for n, d, _ in spec.param_docs()) or "-"
        print(f"{spec.name:<16} {spec.equation}")
        print(f"{'':<16} needs: {spec.needs_text()}")
        print(f"{'':<16} params: {params}")
        print(f"{'':<16} paper: {spec.paper}")
    print("\nModifiers for any paired loss (loss: {name: ..., ld_alpha: 0.5, wpo: true}):")
    for name, text in modifier_docs():
        print(f"  {name}: {text}")
    print("Mix losses with a list: loss: [{name: dpo, weight: 0.8}, {name: sft, weight: 0.2}]")
    return 0


def modifier_docs() -> list[tuple[str, str]]:
    from prefopt.losses.modifiers import MODIFIERS
    return [(spec.name, spec.help) for spec in MODIFIERS.values()]


def losses_markdown() -> str:
    """The README's loss table, generated from the registry (a test keeps them equal)."""
    from prefopt.losses import list_specs

    rows = ["| loss | equation | needs | parameters (defaults) | paper | when to use |",
            "|---|---|---|---|---|---|"]
    for spec in list_specs():
        name = f"`{spec.name}`" + (f" ({', '.join(f'`{a}`' for a in spec.aliases)})" if spec.aliases else "")
        params = ", ".join(f"`{n}={d!r}`" for n, d, _ in spec.param_docs()) or "-"
        cells = [name, spec.equation, spec.needs_text(), params, spec.paper, spec.summary]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def cmd_keys(ns) -> int:
    from prefopt.config import describe_keys

    for key, tp, default, text in describe_keys():
        print(f"{key}  ({tp}, default {default!r})\n    {text}")
    return 0


def cmd_formats(ns) -> int:
    from prefopt.data.formats import FORMATS

    print("Formats, in detection order (data.format: auto: each of the first 100 records takes the first "
          "that matches; the most common one is the data's format):")
    for fmt in FORMATS.values():
        print(f"{fmt.name:<24} {fmt.kind:<10} {fmt.description}\n{'':<35} {fmt.example}")
    return 0


VERBS = {"sft": cmd_train, "dpo": cmd_train, "rm": cmd_rm, "eval": cmd_eval, "generate": cmd_generate, "spin": cmd_method,
         "iterative": cmd_method, "stepwise": cmd_method, "report": cmd_report, "experiment": cmd_experiment,
         "demo": cmd_demo,
         "losses": cmd_losses, "keys": cmd_keys, "formats": cmd_formats}

if __name__ == "__main__":
    sys.exit(main())
