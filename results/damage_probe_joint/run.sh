#!/bin/bash
# Damage probe on the joint grid's other two axes (issue 15): can the policy's inputs predict where the cheapest
# attention level (k010: kappa 0.1, QUEST page 4) or the cheapest bit-width (q5) hurts, as they can for s40
# (results/damage_probe)? For each axis: a damage map of 128 train and 64 dev blocks (each step alone at the
# probe action in an otherwise dense episode), then ridge probes fitted on train and scored on dev at a cheap
# share of 0.5. Dev only; nothing here touches test.
set -euo pipefail
cd "$(dirname "$0")/../.."
D=results/damage_probe_joint
CFG=official_configs/cpu_smollm2_joint_axis.yml
for PROBE in ${PROBES:-k010-s100-q16 k100-s100-q5}; do
  python -m utils.damage_probe collect --config $CFG --set dtype=float32 --split train --blocks 128 --probe $PROBE --save $D/map_train128_$PROBE.pt
  python -m utils.damage_probe collect --config $CFG --set dtype=float32 --split dev --blocks 64 --probe $PROBE --save $D/map_dev64_$PROBE.pt
  python -m utils.damage_probe fit --fit $D/map_train128_$PROBE.pt --eval $D/map_dev64_$PROBE.pt --frac 0.5 --json $D/fit_dev_f0.5_$PROBE.json
done
