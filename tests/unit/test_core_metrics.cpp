// SPDX-License-Identifier: Apache-2.0
// Classification metrics against scikit-learn's documented examples (f1_score, roc_auc_score),
// the counts that cross from the evaluator's child checked, and the limits.
#include "core/math/metrics.hpp"
#include "core/util/error.hpp"

#include <doctest/doctest.h>

#include <vector>

using namespace fedl::core;
using json = nlohmann::json;

namespace {

// One-hot-ish probabilities that predict `predicted` for each sample.
std::vector<float>
predicting(const std::vector<std::int64_t>& predicted, std::int64_t classes)
{
  std::vector<float> p;
  for (const auto k : predicted) {
    for (std::int64_t c = 0; c < classes; ++c) {
      p.push_back(c == k ? 0.8F : 0.2F / static_cast<float>(classes - 1));
    }
  }
  return p;
}

} // namespace

TEST_CASE("metrics: ROC AUC as scikit-learn's roc_auc_score example, ties counting one half")
{
  // roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
  CHECK(*roc_auc({{0.1F, false}, {0.4F, false}, {0.35F, true}, {0.8F, true}}) == doctest::Approx(0.75));
  CHECK(*roc_auc({{0.5F, false}, {0.5F, true}}) == doctest::Approx(0.5));
  CHECK(*roc_auc({{0.9F, true}, {0.1F, false}, {0.2F, false}}) == doctest::Approx(1.0));
  CHECK(*roc_auc({{0.9F, false}, {0.1F, true}}) == doctest::Approx(0.0));
  CHECK_FALSE(roc_auc({{0.1F, true}, {0.2F, true}}));
  CHECK_FALSE(roc_auc({}));
}

TEST_CASE("metrics: precision, recall and F1 as scikit-learn's f1_score example")
{
  // y_true = [0, 1, 2, 0, 1, 2], y_pred = [0, 2, 1, 0, 0, 1]: F1 per class [0.8, 0, 0], macro and
  // weighted 0.2667; precision [2/3, 0, 0], recall [1, 0, 0].
  ClassificationCounts c(3);
  const std::vector<std::int64_t> labels = {0, 1, 2, 0, 1, 2};
  const auto probs = predicting({0, 2, 1, 0, 0, 1}, 3);
  c.add(probs, labels);
  const auto m = c.metrics();
  CHECK(m["macro_f1"].get<double>() == doctest::Approx(0.26666666));
  CHECK(m["weighted_f1"].get<double>() == doctest::Approx(0.26666666));
  REQUIRE(m["per_class"].size() == 3);
  CHECK(m["per_class"][0]["f1"].get<double>() == doctest::Approx(0.8));
  CHECK(m["per_class"][0]["precision"].get<double>() == doctest::Approx(2.0 / 3));
  CHECK(m["per_class"][0]["recall"].get<double>() == doctest::Approx(1.0));
  CHECK(m["per_class"][1]["f1"] == 0.0);
  CHECK(m["per_class"][2]["support"] == 2);
  CHECK_FALSE(m.contains("roc_auc")); // three classes
  CHECK(c.to_counts()["confusion"] == json({2, 0, 0, 1, 0, 1, 0, 2, 0}));
}

TEST_CASE("metrics: two classes add sensitivity, specificity and ROC AUC; undefined ratios are null")
{
  ClassificationCounts c(2);
  // Probabilities of class 1: 0.1, 0.4, 0.35, 0.8 for labels 0, 0, 1, 1 (the AUC example).
  const std::vector<float> probs = {0.9F, 0.1F, 0.6F, 0.4F, 0.65F, 0.35F, 0.2F, 0.8F};
  c.add(probs, std::vector<std::int64_t>{0, 0, 1, 1});
  auto m = c.metrics();
  CHECK(m["roc_auc"].get<double>() == doctest::Approx(0.75));
  CHECK(m["sensitivity"].get<double>() == doctest::Approx(0.5)); // 1 of 2 positives predicted
  CHECK(m["specificity"].get<double>() == doctest::Approx(1.0));
  // Only negatives, all predicted negative: no recall for class 1, no AUC; class 1 in neither
  // labels nor predictions has no F1 and is left out of the macro mean.
  ClassificationCounts n(2);
  n.add(std::vector<float>{0.9F, 0.1F}, std::vector<std::int64_t>{0});
  m = n.metrics();
  CHECK(m["sensitivity"].is_null());
  CHECK(m["roc_auc"].is_null());
  CHECK(m["per_class"][1]["f1"].is_null());
  CHECK(m["macro_f1"] == 1.0);
}

TEST_CASE("metrics: the counts from the evaluator's child are checked before use")
{
  ClassificationCounts c(2);
  c.add(std::vector<float>{0.9F, 0.1F, 0.3F, 0.7F}, std::vector<std::int64_t>{0, 1});
  const auto counts = c.to_counts();
  const auto back = ClassificationCounts::from_counts(counts, 2, "the evaluator");
  CHECK(back.metrics() == c.metrics());
  const auto refused = [](json j, std::uint64_t samples) {
    CHECK_THROWS_AS(ClassificationCounts::from_counts(j, samples, "the evaluator"), Error);
  };
  refused(counts, 3); // do not add up
  auto j = counts;
  j["classes"] = 100000;
  refused(j, 2);
  j = counts;
  j["confusion"] = {1, 1, 0};
  refused(j, 2);
  j = counts;
  j["confusion"][0] = -1;
  refused(j, 2);
  j = counts;
  j["roc_auc"] = 1.5;
  refused(j, 2);
  refused(json::array(), 2);
  CHECK_THROWS_AS(ClassificationCounts(1), UsageError);
  ClassificationCounts nan(2);
  CHECK_THROWS_WITH(nan.add(std::vector<float>{NAN, 0.5F}, std::vector<std::int64_t>{0}),
                    doctest::Contains("not finite"));
  CHECK_THROWS_AS(ClassificationCounts(max_metric_classes + 1), UsageError);
}

TEST_CASE("metrics: the sites' evaluations pool as sample-weighted means; out-of-range ones are left out")
{
  const auto site = [](double a, double l, json n) {
    return json{{"eval_accuracy", a}, {"eval_loss", l}, {"eval_samples", n}, {"loss", 9.0}};
  };
  json m = {{"a", site(0.5, 1.0, 10U)}, {"b", site(1.0, 0.25, 30U)}, {"c", {{"loss", 0.1}}}};
  auto p = pool_site_evaluations(m, 1000);
  CHECK(p["accuracy"].get<double>() == doctest::Approx((0.5 * 10 + 1.0 * 30) / 40));
  CHECK(p["loss"].get<double>() == doctest::Approx((1.0 * 10 + 0.25 * 30) / 40));
  CHECK(p["samples"] == 40);
  CHECK(p["sites"] == 2);
  // A hostile site's figures out of range do not count: accuracy above 1, a negative or
  // infinite loss, zero, negative or too many samples.
  m["d"] = site(1.5, 0.1, 10U);
  m["e"] = site(0.5, -1, 10U);
  m["f"] = site(0.5, INFINITY, 10U);
  m["g"] = site(0.5, 0.1, 0U);
  m["h"] = site(0.5, 0.1, -5);
  m["i"] = site(0.5, 0.1, 5000U);
  m["j"] = site(0.5, 0.1, "10");
  p = pool_site_evaluations(m, 1000);
  CHECK(p["sites"] == 2);
  CHECK(p["samples"] == 40);
  CHECK(pool_site_evaluations(json::object(), 1000).is_null());
  CHECK(pool_site_evaluations(json::array(), 1000).is_null());
}

TEST_CASE("metrics: the sites' confusion matrices pool exactly; counts that do not add up are left out")
{
  // Two sites of the f1_score example split in halves: the pool is the whole example.
  ClassificationCounts first(3), second(3), whole(3);
  const std::vector<std::int64_t> labels = {0, 1, 2, 0, 1, 2};
  const auto probs = predicting({0, 2, 1, 0, 0, 1}, 3);
  first.add(std::span(probs).first(9), std::span(labels).first(3));
  second.add(std::span(probs).subspan(9), std::span(labels).subspan(3));
  whole.add(probs, labels);
  const auto site = [](const ClassificationCounts& c, double accuracy) {
    return json{{"eval_accuracy", accuracy},
                {"eval_loss", 1.0},
                {"eval_samples", c.samples()},
                {"eval_classes", c.classes()},
                {"eval_confusion", c.to_counts()["confusion"]}};
  };
  json m = {{"a", site(first, 2.0 / 3)}, {"b", site(second, 0.0)}};
  auto p = pool_site_evaluations(m, 1000);
  CHECK(p["classification_sites"] == 2);
  CHECK(p["macro_f1"].get<double>() == doctest::Approx(0.26666666));
  CHECK(p["per_class"] == whole.metrics()["per_class"]);
  CHECK_FALSE(p.contains("roc_auc"));
  // A site whose counts do not add up to its samples still counts for accuracy and loss.
  m["c"] = site(first, 0.5);
  m["c"]["eval_samples"] = 4U;
  p = pool_site_evaluations(m, 1000);
  CHECK(p["sites"] == 3);
  CHECK(p["classification_sites"] == 2);
  CHECK_THROWS_AS(first.merge(ClassificationCounts(2)), Error);
  // Two classes: each site's AUC stays its own; the pool has none.
  ClassificationCounts two(2);
  two.add(std::vector<float>{0.9F, 0.1F, 0.3F, 0.7F}, std::vector<std::int64_t>{0, 1});
  two.merge(two);
  CHECK(two.samples() == 4);
  CHECK(two.metrics()["roc_auc"].is_null());
}
