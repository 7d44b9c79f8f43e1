"""benchmarks.report's seeds table: means and gaps computed by hand from made-up result files."""
import pytest

from benchmarks import report


def _results(seed, rows, float_acc, float_bn=None, epochs=3, command="cmd", learning_rate=5e-4):
    protocol = {"model": "mobile_swish", "float_epochs": 3, "epochs": epochs, "learning_rate": learning_rate,
                "limit": None, "scale_parameterization": "log", "scale_lr_multiplier": None, "seed": seed}
    float_row = {"method": "float", "weight_bits": None, "options": None, "keras_accuracy": float_acc}
    if float_bn is not None:
        float_row["keras_accuracy_bn_reestimated"] = float_bn
    variants = [float_row]
    for config, bits, acc, bn in rows:
        row = {"method": "lsq+", "weight_bits": bits, "activation_bits": bits,
               "options": {"activation_config": config}, "keras_accuracy": acc}
        if bn is not None:
            row["keras_accuracy_bn_reestimated"] = bn
        variants.append(row)
    return {"protocol": protocol, "variants": variants, "command": command}


def _row(table, start):
    return next(line for line in table.splitlines() if line.startswith(start))


def test_means_and_gaps_per_seed_against_each_files_float_row():
    files = [_results(0, [(3, 4, 0.88, None), (3, 2, 0.70, None)], 0.90),
             _results(1, [(3, 4, 0.86, 0.87)], 0.89, float_bn=0.89),
             _results(1, [(3, 2, 0.60, None)], 0.80)]   # seed 1's W2 row in another file, its own float row
    table = report.lsq_seeds_table(files)
    w4 = _row(table, "| lsq+ config 3 | 4/4 |").split(" | ")
    # mean acc (0.88 + 0.86) / 2; gaps -2 and -3 points; BatchNorm gap only on seed 1: 0.87 - 0.89
    assert w4[2:7] == ["2", "0.8700", "0.8600 - 0.8800", "-2.50", "s0: -2.00 / s1: -3.00"]
    assert w4[7].startswith("-2.00 (1)")
    w2 = _row(table, "| lsq+ config 3 | 2/2 |").split(" | ")
    assert w2[5:7] == ["-20.00", "s0: -20.00 / s1: -20.00"]
    assert w2[7].startswith("—")
    assert table.index("| 4/4 |") < table.index("| 2/2 |")   # higher bit-widths first


def test_a_variant_measured_twice_for_one_seed_is_an_error_unless_the_same_number():
    with pytest.raises(ValueError, match="seed 1 is in two result files"):
        report.lsq_seeds_table([_results(1, [(4, 2, 0.7, None)], 0.9), _results(1, [(4, 2, 0.6, None)], 0.9)])
    table = report.lsq_seeds_table([_results(1, [(4, 2, 0.7, None)], 0.9), _results(1, [(4, 2, 0.7, None)], 0.9)])
    assert _row(table, "| lsq+ config 4 | 2/2 |").split(" | ")[2] == "1"


def test_files_with_different_budgets_are_not_mixed():
    with pytest.raises(ValueError, match="different budgets"):
        report.lsq_seeds_table([_results(0, [(4, 2, 0.7, None)], 0.9),
                                _results(1, [(4, 2, 0.6, None)], 0.9, epochs=1)])


def test_learning_rate_table_shows_the_studied_variants_at_every_rate():
    protocol = [_results(0, [(3, 4, 0.88, None), (1, 4, 0.87, None), (3, 2, 0.70, None)], 0.90),
                _results(1, [(3, 4, 0.86, None)], 0.89)]
    other_rate = [_results(1, [(3, 4, 0.88, 0.885)], 0.895, float_bn=0.90, learning_rate=1e-3)]
    table = report.lsq_learning_rate_table(protocol, other_rate)
    body = [line for line in table.splitlines() if line.startswith("| lsq+")]
    assert len(body) == 2   # only W4A4 config 3 was studied at another rate
    at_protocol, at_other = (line.split(" | ") for line in body)
    assert at_protocol[2] == "0.0005" and at_protocol[3:8] == ["2", "0.8700", "0.8600 - 0.8800", "-2.50",
                                                                   "s0: -2.00 / s1: -3.00"]
    assert at_protocol[9].startswith("0.8950")   # mean of the two float rows
    assert at_other[2] == "0.001" and at_other[6:8] == ["-1.50", "s1: -1.50"] and at_other[8] == "-1.50 (1)"
    with pytest.raises(ValueError, match="different budgets"):
        report.lsq_learning_rate_table(protocol, [_results(1, [(3, 4, 0.88, None)], 0.9, epochs=1, learning_rate=1e-3)])


def test_learning_rate_table_orders_by_variant_and_names_machines_when_they_differ():
    protocol = [_results(0, [(3, 4, 0.88, None), (3, 2, 0.70, None)], 0.90)]
    # at 1e-3, seed 0's W4 and W2 rows come from two runs with their own float rows, on another CPU
    w4 = _results(0, [(3, 4, 0.89, None)], 0.91, learning_rate=1e-3, command="w4")
    w2 = _results(0, [(3, 2, 0.75, None)], 0.80, learning_rate=1e-3, command="w2")
    protocol[0]["machine"] = {"cpu": "AMD EPYC"}
    w4["machine"] = w2["machine"] = {"cpu": "Intel Xeon"}
    table = report.lsq_learning_rate_table(protocol, [w4, w2])
    body = [line.split(" | ") for line in table.splitlines() if line.startswith("| lsq+")]
    assert [(cells[1], cells[2]) for cells in body] == [("4/4", "0.0005"), ("4/4", "0.001"),
                                                         ("2/2", "0.0005"), ("2/2", "0.001")]
    assert body[3][6] == "-5.00" and body[3][9].startswith("0.8000")   # W2's own float row, not W4's
    assert body[1][6] == "-2.00" and body[1][9].startswith("0.9100")
    assert "`w4` (Intel Xeon)" in table and "`cmd` (AMD EPYC)" in table
    one_machine = report.lsq_learning_rate_table([_results(0, [(3, 4, 0.88, None)], 0.90)],
                                                 [_results(0, [(3, 4, 0.89, None)], 0.91, learning_rate=1e-3)])
    assert "(" not in one_machine.split("Commands:")[1]


def test_budget_table_sets_longer_fine_tuning_beside_three_epochs_at_the_same_rate():
    three = [_results(0, [(4, 4, 0.88, None), (4, 2, 0.70, None)], 0.90, learning_rate=1e-3)]
    six = [_results(0, [(4, 4, 0.895, None)], 0.905, epochs=6, learning_rate=1e-3),
           _results(1, [(4, 4, 0.89, None)], 0.90, epochs=6, learning_rate=1e-3)]
    table = report.lsq_budget_table(three, six)
    body = [line.split(" | ") for line in table.splitlines() if line.startswith("| lsq+")]
    assert [(cells[1], cells[2]) for cells in body] == [("4/4", "3"), ("4/4", "6")]   # W2 was not studied
    assert body[0][6] == "-2.00" and body[1][3:8] == ["2", "0.8925", "0.8900 - 0.8950", "-1.00",
                                                      "s0: -1.00 / s1: -1.00"]
    assert body[1][9].startswith("0.9025")
    with pytest.raises(ValueError, match="epochs table"):   # another learning rate is another budget
        report.lsq_budget_table([_results(0, [(4, 4, 0.88, None)], 0.9, learning_rate=5e-4)], six)


def test_markers_are_filled_whether_empty_or_holding_an_earlier_table():
    empty = "a\n<!-- results:t -->\n<!-- /results:t -->\nb"
    assert report.fill_markers(empty, "t", "| x |") == "a\n<!-- results:t -->\n| x |\n<!-- /results:t -->\nb"
    earlier = "a\n<!-- results:t -->\n| old |\n| rows |\n<!-- /results:t -->\nb"
    assert report.fill_markers(earlier, "t", "| x |") == empty.replace("-->\n<!-- /", "-->\n| x |\n<!-- /")
    assert report.fill_markers(earlier, "other", "| x |") == earlier
