/* SPDX-License-Identifier: Apache-2.0 */
/* The C interface between the fedl binary and a compute backend shared object.
 *
 * A backend (libfedl-backend-NAME.so) exports one function, `fedl_backend_entry`, that returns a
 * table of function pointers for the interface version asked for, or NULL. Only C types cross:
 * a backend built with another compiler, C++ standard library or ABI (an upstream LibTorch with
 * CUDA, a vendor's NPU runtime) still loads. Strings returned by the backend stay valid until
 * the next call on the same model (or, for the device list, for the life of the process).
 *
 * Failures return a non-zero status; `last_error` then describes the failure (thread-local).
 * Status FEDL_STATUS_USAGE means the request was wrong (exit 2); FEDL_STATUS_DATA means the
 * data did not fit (exit 1); FEDL_STATUS_INTERRUPTED means the progress callback asked to stop.
 */
#ifndef FEDL_BACKENDS_BACKEND_H
#define FEDL_BACKENDS_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C"
{
#endif

#define FEDL_BACKEND_ABI_VERSION 4u

  enum fedl_status
  {
    FEDL_STATUS_OK = 0,
    FEDL_STATUS_FAILURE = 1,
    FEDL_STATUS_USAGE = 2,
    FEDL_STATUS_DATA = 3,
    FEDL_STATUS_INTERRUPTED = 4,
    FEDL_STATUS_VERIFY = 5 /* a file is not what it claims (exit 3) */
  };

  /* dtype codes match core::DType's order. */
  enum fedl_dtype
  {
    FEDL_F64 = 0,
    FEDL_F32 = 1
  };

  typedef struct fedl_tensor
  {
    const char* name;
    int32_t dtype; /* enum fedl_dtype */
    int32_t ndim;
    const int64_t* shape;
    void* data; /* contiguous, row-major, little-endian */
    size_t nbytes;
  } fedl_tensor;

  typedef struct fedl_dataset
  {
    const float* features; /* count * prod(sample_shape) floats, row-major */
    const int64_t* labels; /* count labels in [0, classes) */
    uint64_t count;
    int32_t sample_ndim;
    const int64_t* sample_shape;
  } fedl_dataset;

  enum fedl_optimizer
  {
    FEDL_OPT_SGD = 0,
    FEDL_OPT_ADAM = 1
  };

  typedef struct fedl_train_config
  {
    uint32_t epochs;
    uint32_t batch_size;
    double lr;
    int32_t optimizer; /* enum fedl_optimizer */
    double momentum;
    double prox_mu; /* FedProx: mu/2 * ||w - w_start||^2 added to the loss; 0 = off */
    uint64_t seed;
    /* DP-SGD (ABI 2; Abadi et al. 2016, "Deep Learning with Differential Privacy"). Off when
     * dp_max_grad_norm is 0. When on, each step draws its batch by Poisson sampling: every
     * example independently with probability q = batch_size / count (batch sizes vary; an empty
     * batch still takes a step of noise); each example's gradient (over all parameters) is clipped
     * to L2 norm dp_max_grad_norm; Gaussian noise of standard deviation dp_noise_multiplier *
     * dp_max_grad_norm is added to the sum of clipped gradients, which is then divided by
     * batch_size (the expected batch size). ceil(count / batch_size) steps per epoch.
     * batch_size > count is FEDL_STATUS_USAGE (q would exceed 1). */
    double dp_noise_multiplier; /* >= 0 */
    double dp_max_grad_norm;    /* > 0 to enable */
    uint64_t dp_noise_seed;     /* 0: seed the noise from the OS (getrandom/std::random_device): nobody, not even the
                                   coordinator that chose `seed`, can predict it; non-zero: fixed, for tests */
  } fedl_train_config;

  typedef struct fedl_train_result
  {
    double loss;      /* mean training loss of the last epoch */
    uint64_t samples; /* samples seen per epoch */
    uint64_t steps;
    uint64_t dp_steps; /* (ABI 2) the steps taken with DP-SGD: all of them when it was asked for,
                        * else 0; fedl checks it, so a backend that ignores the DP fields is
                        * caught rather than trusted */
  } fedl_train_result;

  typedef struct fedl_eval_result
  {
    double loss;
    double accuracy;
    uint64_t samples;
  } fedl_eval_result;

  /* Called after the first step, every 50 steps (`epoch_done` 0, `loss` of that step) and at the
   * end of each epoch (`epoch_done` 1, `loss` the epoch's mean). `step` counts within the epoch,
   * from 1. A non-zero return stops training with FEDL_STATUS_INTERRUPTED. */
  typedef int (*fedl_progress_fn)(void* user, uint32_t epoch, uint64_t step, uint64_t steps_per_epoch, double loss,
                                  int epoch_done);

  typedef struct fedl_model fedl_model;

  typedef struct fedl_backend_v1
  {
    uint32_t abi_version; /* FEDL_BACKEND_ABI_VERSION */
    const char* name;     /* "torch" */
    const char* runtime;  /* e.g. "LibTorch 1.13.0" */

    /* Devices this backend can use, most capable first ("cuda:0", "cpu"). */
    size_t (*device_count)(void);
    const char* (*device_name)(size_t index);
    const char* (*last_error)(void);

    /* Sets the number of CPU threads for compute (0 = leave the default). */
    void (*set_threads)(int32_t threads);

    /* A zoo model from its spec ("logreg", "mlp:128", "cnn"), initialised from `seed`. */
    int (*model_create)(const char* spec, int32_t input_ndim, const int64_t* input_shape, int64_t classes,
                        uint64_t seed, const char* device, fedl_model** out);
    /* A TorchScript module saved by torch.jit.save. */
    int (*model_load_torchscript)(const char* path, const char* device, fedl_model** out);
    void (*model_free)(fedl_model* model);

    /* The model's weights (parameters, then floating-point buffers) in a stable order. The
     * tensors and their data stay valid until the next call on `model`. */
    int (*model_get_weights)(fedl_model* model, const fedl_tensor** tensors, size_t* count);
    /* Replaces the weights; every tensor of the model must be given, with its shape and dtype. */
    int (*model_set_weights)(fedl_model* model, const fedl_tensor* tensors, size_t count);

    int (*model_train)(fedl_model* model, const fedl_dataset* data, const fedl_train_config* config,
                       fedl_progress_fn progress, void* user, fedl_train_result* result);
    int (*model_evaluate)(fedl_model* model, const fedl_dataset* data, uint32_t batch_size, fedl_eval_result* result);

    /* (ABI 3) Inspects the TorchScript module at `path` before anything of it runs, against the
     * backend's operator allow-list: *report is JSON text (fedl-inspect(1): "verdict", "refused",
     * "needs_dp_off", "operators", "methods", "parameters", "buffers", "allow_list_version"),
     * valid until the next call on this thread. FEDL_STATUS_VERIFY if the file is not a module.
     * NULL in a backend that cannot inspect: fedl then refuses TorchScript modules on it. */
    int (*torchscript_inspect)(const char* path, const char** report);

    /* (ABI 4) The class probabilities (the softmax of the model's outputs, in evaluation mode) of
     * samples [first, first + count) of `data`, a row of `classes` floats per sample, into
     * `probabilities`. The outputs must have exactly `classes` columns (FEDL_STATUS_DATA if
     * not). fedl computes every metric beyond accuracy and loss from these (fedl eval
     * --metrics-set). NULL in a backend that cannot: fedl then offers accuracy and loss only. */
    int (*model_predict)(fedl_model* model, const fedl_dataset* data, uint64_t first, uint64_t count, int64_t classes,
                         float* probabilities);
  } fedl_backend_v1;

  /* The one symbol a backend exports. Returns NULL if it does not implement `abi_version`. */
  typedef const fedl_backend_v1* (*fedl_backend_entry_fn)(uint32_t abi_version);
#define FEDL_BACKEND_ENTRY_SYMBOL "fedl_backend_entry"

#ifdef __cplusplus
}
#endif

#endif
