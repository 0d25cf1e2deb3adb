"""The public EDGE README's commands (ichbill/EDGE) parsed by our scripts (issue 15).

Each command is the public README's, word for word apart from paths moved under tmp_path; it is run to
the point of argument parsing and the resulting arguments are checked.
"""
import shlex

import pytest

import caption_synthesis_gpt as gpt_script
import caption_synthesis_llama as llama_script
import caption_synthesis_llava as llava_script
import edge_diffusion_sampling as sampling_script
import edge_diffusion_train as train_script
from evaluation import evaluation as eval_script
from utils.common.errors import InputError, run_cli


def argv(cmd: str) -> list:
    """The arguments of a README command line (script name and launcher stripped)."""
    words = shlex.split(cmd.replace("\\\n", " "))
    return words[[i for i, w in enumerate(words) if w.endswith(".py")][-1] + 1:]


@pytest.fixture
def paper_tree(tmp_path, monkeypatch):
    """The public code's working directory: checkpoints/<name>/ and data/coco/annotations.json."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints" / "your_checkpoint").mkdir(parents=True)
    (tmp_path / "data" / "coco").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "annotations.json").write_text("[]")
    return tmp_path


SAMPLE_SINGLE = """python edge_diffusion_sampling.py \\
    --dataset coco \\
    --num_queries 1000 \\
    --sd_model your_checkpoint \\
    --save_tag experiment_name"""
SAMPLE_MULTI = """CUDA_VISIBLE_DEVICES=0,1,2,3 accelerate launch --num_processes=4 \\
    edge_diffusion_sampling.py \\
    --dataset coco \\
    --num_queries 1000 \\
    --sd_model your_checkpoint \\
    --save_tag experiment_name"""
GPT = """python caption_synthesis_gpt.py \\
    --dataset coco \\
    --label_file_path ./data/coco/annotations.json \\
    --cpi 2 \\
    --save_tag gpt4_captions"""
LLAVA = """CUDA_VISIBLE_DEVICES=0 python caption_synthesis_llava.py \\
    --dataset coco \\
    --label_file_path ./data/coco/annotations.json \\
    --cpi 2 \\
    --save_tag llava_captions"""
LLAMA = """python caption_synthesis_llama.py \\
    --dataset coco \\
    --image_root ./data/coco \\
    --ann_root ./data/coco \\
    --ckpt_dir /path/to/llama/checkpoint \\
    --output_file ./synthesized_captions.json"""
EVAL = """CUDA_VISIBLE_DEVICES=0 python evaluation/evaluation.py \\
    --dataset coco \\
    --distill_image ./sampling_results/coco/experiment/images/ \\
    --distill_ann ./sampling_results/coco/experiment/ \\
    --image_root ./data/coco/ \\
    --ann_root ./data/coco/ \\
    --text_encoder bert \\
    --batch_size_train 64 \\
    --batch_size_test 100"""
TRAIN = "python edge_diffusion_train.py"


@pytest.mark.parametrize("cmd", [SAMPLE_SINGLE, SAMPLE_MULTI], ids=["one_gpu", "accelerate"])
def test_sampling_command(paper_tree, cmd):
    args = sampling_script.parse_args(argv(cmd))
    assert args.dataset == "coco" and args.num_queries == 1000
    assert args.pretrained_model_name_or_path == "checkpoints/your_checkpoint"  # found as the public code does
    assert args.output_dir == "sampling_results/coco/experiment_name"
    assert not any(k in vars(args) for k in ("save_tag", "sd_model"))


@pytest.mark.parametrize("script, cmd, tag", [(gpt_script, GPT, "gpt4_captions"),
                                              (llava_script, LLAVA, "llava_captions")], ids=["gpt", "llava"])
def test_gpt_and_llava_commands(paper_tree, script, cmd, tag):
    args = script.parse_args(argv(cmd))
    assert args.input_dir == "data/coco" and args.cpi == 2 and not args.inplace
    assert args.output_dir == f"sampling_results/coco/{tag}"
    assert not any(k.startswith("paper_") for k in vars(args)) and "save_tag" not in vars(args)


def test_llama_command_says_what_to_use_instead(paper_tree, capsys):
    with pytest.raises(InputError, match=r"--image_root \(the paper code's flag\).*--input_dir") as e:
        llama_script.parse_args(argv(LLAMA))
    assert "\n" not in str(e.value)
    assert run_cli(lambda a: None, llama_script.parse_args, argv(LLAMA)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --image_root")
    # the public flags that do carry over, with our input and output
    args = llama_script.parse_args(["--dataset", "coco", "--ckpt_dir", "/path/to/llama", "--max_batch_size", "4",
                                    "--max_gen_len", "64", "--tokenizer_path", "/path/tok.model",
                                    "--input_dir", "sampling_results/coco/x", "--inplace"])
    assert (args.model, args.batch_size, args.max_new_tokens) == ("/path/to/llama", 4, 64)
    assert "--tokenizer_path (the paper code's flag) is ignored" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"--output_file .*--output_dir <folder>"):
        llama_script.parse_args(["--input_dir", "x", "--output_file", "./synthesized_captions.json"])


def test_evaluation_command(paper_tree, capsys):
    args = eval_script.parse_args(argv(EVAL))
    assert args.dataset == "coco" and args.distill_dir == "./sampling_results/coco/experiment/"
    assert (args.image_root, args.ann_root) == ("./data/coco/", "./data/coco/")
    assert args.text_encoder == "bert-base-uncased"
    assert (args.batch_size_train, args.batch_size_test) == (64, 100)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: --distill_image (the paper code's flag) is ignored")
    args = eval_script.parse_args(["--dataset", "flickr", "--distill_ann", "d", "--image_encoder", "nfnet",
                                   "--lr_teacher_img", "0.2", "--lr_teacher_txt", "0.3", "--train_epochs", "7",
                                   "--eval_freq", "1", "--mom", "0.5", "--l2", "0", "--decay", "--name", "run"])
    assert (args.dataset, args.image_encoder, args.lr_img, args.lr_txt) == ("flickr30k", "nfnet_l0", 0.2, 0.3)
    assert (args.epochs, args.eval_every, args.momentum, args.weight_decay) == (7, 1, 0.5, 0.0)
    assert (args.lr_schedule, args.run_name) == ("step", "run")


def test_train_command(paper_tree):
    with pytest.raises(InputError, match="--output_dir is required"):  # the public script has built-in paths
        train_script.parse_args(argv(TRAIN))
    args = train_script.parse_args(["--dataset", "flickr30k", "--ann_root", "./data/Flickr30k_ann/", "--lr", "1e-3",
                                    "--contrastive_lambda", "1.0", "--diversity_lambda", "0.5", "--num_epochs", "10",
                                    "--checkpoint_path", "checkpoints/pipe", "--batch_size_train", "128",
                                    "--image_size", "224"])
    assert (args.learning_rate, args.lambda_contrastive, args.lambda_diversity) == (1e-3, 1.0, 0.5)
    assert (args.num_train_epochs, args.output_dir, args.train_batch_size, args.resolution) == \
        (10, "checkpoints/pipe", 128, 224)


SAMPLE_BASE = ["--prompts_file", "p.txt", "--pretrained_model_name_or_path", "m", "--output_dir", "o"]


@pytest.mark.parametrize("script, args, match", [
    (train_script, ["--ann_root", "a", "--output_dir", "o", "--fraction", "0.5"], r"--fraction .*--max_train_samples"),
    (sampling_script, SAMPLE_BASE + ["--ipc", "4"], r"--ipc .*--num_queries"),
    (sampling_script, SAMPLE_BASE + ["--prompt_engineering"], r"--prompt_engineering .*--prompts_file"),
    (llava_script, ["--input_dir", "x", "--inplace", "--load_4bit"], r"--load_4bit .*--dtype float16"),
    (sampling_script, SAMPLE_BASE + ["--dataset", "coco", "--save_tag", "t"], r"--output_dir or --save_tag"),
], ids=["fraction", "ipc", "prompt_engineering", "load_4bit", "save_tag_and_output_dir"])
def test_flags_without_equivalent_are_one_line(paper_tree, capsys, script, args, match):
    with pytest.raises(InputError, match=match):
        script.parse_args(args)
    assert run_cli(lambda a: None, script.parse_args, args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_ipc_1_is_the_same_and_gpt_ignores_load_4bit(paper_tree, capsys):
    args = sampling_script.parse_args(["--prompts_file", "p.txt", "--pretrained_model_name_or_path", "m",
                                       "--output_dir", "o", "--ipc", "1"])
    assert "ipc" not in vars(args) and "paper_ipc" not in vars(args)
    gpt_script.parse_args(["--input_dir", "x", "--inplace", "--load_4bit"])
    assert "--load_4bit (the paper code's flag) is ignored" in capsys.readouterr().err


def test_help_lists_the_paper_names_and_recipes_point_to_ours(paper_tree, capsys):
    with pytest.raises(SystemExit):
        sampling_script.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--sd_model" in out and "--save_tag" in out and "paper code's flag names" in out
    (paper_tree / "r.yaml").write_text("lr: 0.1\n")
    with pytest.raises(InputError, match=r"r\.yaml: unknown option 'lr' \(use learning_rate\)"):
        train_script.parse_args(["--config", "r.yaml", "--ann_root", "a", "--output_dir", "o"])
