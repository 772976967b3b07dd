# SPDX-License-Identifier: Apache-2.0
# The cnn on the full Fashion-MNIST (Debian's dataset-fashion-mnist, installed by the setup).

FMNIST=/usr/share/datasets/fashion-mnist

suite_probe()
{
  [[ -f $FMNIST/train-images-idx3-ubyte.gz ]] || { echo "dataset-fashion-mnist is not installed"; return 1; }
}

test_cnn_one_epoch_reaches_85_percent()
{
  fedl_expect 0 --json train --data "$FMNIST/train-images-idx3-ubyte.gz" --arch cnn --epochs 1 --batch-size 64 \
    --lr 0.05 --momentum 0.9 --seed 0 --save-model cnn.st || return
  echo "train: $(cat out)"
  [[ $(json_get out "j['samples']") == 60000 ]] || fail "expected the 60000 training images"
  fedl_expect 0 --json eval --model cnn.st --data "$FMNIST/t10k-images-idx3-ubyte.gz" || return
  local acc
  acc=$(json_get out "j['accuracy']")
  echo "Fashion-MNIST cnn, 1 epoch, test accuracy: $acc"
  check_py "$acc >= 0.85" "Fashion-MNIST accuracy $acc < 0.85"
  [[ $(json_get out "j['samples']") == 10000 ]] || fail "expected the 10000 test images"
}
