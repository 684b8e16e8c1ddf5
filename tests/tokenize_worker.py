"""One rank of ``fastcodec tokenize`` with the tiny test model (run by test_tokenize under torchrun):
the command's own code (argument parsing, process group, sharding, merge), only the model is given."""
import sys

from fastcodec import cli, codec_cli
from tests.codec_fixtures import tiny_model

if __name__ == "__main__":
    args = cli._parser().parse_args(["tokenize", *sys.argv[1:], "--model", "tiny", "--quiet"])
    sys.exit(codec_cli.tokenize(args, model=tiny_model()))
