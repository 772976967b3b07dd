// SPDX-License-Identifier: Apache-2.0
// Classification metrics beyond accuracy and loss, from a model's class probabilities: per class
// precision, recall (sensitivity), F1 and support; macro and weighted F1; and for two classes
// specificity and the area under the ROC curve. `fedl eval --metrics-set classification` and the
// coordinator's evaluation (`fedl serve --metrics-set`) report them.
//
// Definitions (as scikit-learn's, except that an undefined precision or recall is null rather
// than 0): the predicted class is the most probable one (the first on a tie); precision =
// TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN) (0 for a class only in the
// labels or only in the predictions); macro F1 the mean over the classes in the labels or the
// predictions, weighted F1 the mean weighted by support. ROC AUC is the probability that a positive
// sample scores above a negative one, ties counting one half (the Mann-Whitney U statistic over
// n+ n-; Hanley and McNeil 1982), from the probability of class 1.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

namespace fedl::core {

enum class MetricsSet
{
  basic,         // accuracy, loss, samples
  classification // and the metrics above
};
std::optional<MetricsSet> parse_metrics_set(std::string_view name);
const char* metrics_set_name(MetricsSet set) noexcept;

// The most classes whose confusion matrix (classes^2 counts) is kept and sent; past it, a metrics
// set beyond basic is refused.
inline constexpr std::int64_t max_metric_classes = 1000;
// The most classes whose confusion matrix a site sends with its update (fedl join --metrics-set
// classification): it must fit a frame header with room to spare.
inline constexpr std::int64_t max_site_eval_classes = 32;

// The area under the ROC curve of (score, positive) pairs; nullopt if either class is absent.
std::optional<double> roc_auc(std::vector<std::pair<float, bool>> scores);

class ClassificationCounts
{
public:
  // UsageError if classes is not in [2, max_metric_classes].
  explicit ClassificationCounts(std::int64_t classes);

  // Adds n samples: `probabilities` n rows of classes, `labels` n labels below classes. Error if a
  // probability is not finite (a model that output NaN).
  void add(std::span<const float> probabilities, std::span<const std::int64_t> labels);

  // Adds another's counts (same classes; Error otherwise). The ROC AUC does not pool (it needs
  // every sample's score): the sum has none.
  void merge(const ClassificationCounts& other);

  std::int64_t classes() const noexcept { return m_classes; }
  std::uint64_t samples() const noexcept { return m_samples; }

  // What crosses from the evaluator's sandboxed child to its parent: {"classes", "confusion"
  // (row-major [true][predicted]), "roc_auc" (two classes; null if a class is absent)}.
  nlohmann::json to_counts() const;
  // The same, checked: ProtocolError-free, an Error naming `what` for any other form (classes out
  // of range, a count that is not a number, counts that do not add up to `samples`, an AUC
  // outside [0, 1]).
  static ClassificationCounts from_counts(const nlohmann::json& j, std::uint64_t samples, const std::string& what);

  // The metrics: "macro_f1", "weighted_f1", "per_class" ([{class, precision, recall, f1,
  // support}], only up to `per_class_limit` classes), and for two classes "roc_auc",
  // "sensitivity", "specificity".
  nlohmann::json metrics(std::int64_t per_class_limit = max_metric_classes) const;

private:
  std::int64_t m_classes;
  std::uint64_t m_samples = 0;
  std::vector<std::uint64_t> m_confusion;       // [true * classes + predicted]
  std::vector<std::pair<float, bool>> m_scores; // two classes: (p(class 1), label == 1)
  std::optional<double> m_auc;                  // from_counts: as received
};

// The sites' evaluations of one global model on their own data (fedl join --eval-data), pooled:
// accuracy and loss as means weighted by each site's samples, which is exact (both are means
// over samples). `site_metrics` is {site: {"eval_accuracy", "eval_loss", "eval_samples", ...}};
// a site without them, or with a value out of range (accuracy outside [0, 1], a negative or
// non-finite loss, samples not a positive integer of at most `max_samples`), is left out.
// Returns {"accuracy", "loss", "samples", "sites"}, or null if no site's evaluation counts.
// Sites that also sent "eval_classes" and "eval_confusion" (join --metrics-set classification)
// have their confusion matrices summed, which pools exactly: the result adds the metrics of
// ClassificationCounts::metrics but the ROC AUC, and "classification_sites" (how many).
nlohmann::json pool_site_evaluations(const nlohmann::json& site_metrics, std::uint64_t max_samples);

} // namespace fedl::core
