"""The calibration table: which prompts SAS runs through every layer."""
import random

from steerguard.export.calibrate import CalibrationConfig, CalibrationData, CalibrationTable
from steerguard.export.data import default_pairs


def test_sas_reads_a_per_source_sample_of_the_plain_training_pairs():
    data = CalibrationData(pairs=[p for p in default_pairs() if p.source in ("contrast-a", "contrast-b", "vlsafe")])
    table = CalibrationTable.build(data, CalibrationConfig(max_per_source=60))
    rows = table.sas_pairs(25, random.Random(3))
    assert rows == sorted(rows) and len(set(rows)) == len(rows) == 75
    assert all(r % 2 == 0 and r < 2 * table.plain_pairs and not table.val[r] for r in rows)  # harmful sides
    assert all(table.labels[r] == 1 and table.labels[r + 1] == 0 for r in rows)
    per_source = {}
    for r in rows:
        per_source[table.sources[r]] = per_source.get(table.sources[r], 0) + 1
    assert per_source == {"contrast-a+": 25, "contrast-b+": 25, "vlsafe+": 25}
    assert table.sas_pairs(25, random.Random(3)) == rows                   # seeded
    assert len(table.sas_pairs(1000, random.Random(3))) == int((~table.val[0:2 * table.plain_pairs:2]).sum())
