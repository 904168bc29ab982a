import pytest

from bench.canary import main


@pytest.mark.parametrize("argv", [["--bad-trials", "0"], ["--equivalent-trials", "0"],
                                  ["--latency-seconds", "0"], ["--canary-share", "0"]])
def test_bad_arguments_exit_2_before_any_stack_starts(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
