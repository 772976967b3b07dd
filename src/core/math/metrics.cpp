// SPDX-License-Identifier: Apache-2.0
#include "core/math/metrics.hpp"

#include "core/util/error.hpp"

#include <algorithm>
#include <cmath>

namespace fedl::core {

namespace {

using json = nlohmann::json;

json
ratio(std::uint64_t num, std::uint64_t den)
{
  return den == 0 ? json(nullptr) : json(static_cast<double>(num) / static_cast<double>(den));
}

} // namespace

std::optional<MetricsSet>
parse_metrics_set(std::string_view name)
{
  if (name == "basic") {
    return MetricsSet::basic;
  }
  if (name == "classification") {
    return MetricsSet::classification;
  }
  return std::nullopt;
}

const char*
metrics_set_name(MetricsSet set) noexcept
{
  return set == MetricsSet::basic ? "basic" : "classification";
}

std::optional<double>
roc_auc(std::vector<std::pair<float, bool>> scores)
{
  // Rank-sum form of Mann-Whitney: sort by score; each positive beats the negatives below it and
  // ties half of those of equal score.
  std::sort(scores.begin(), scores.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  double pos = 0, neg = 0, wins = 0;
  for (std::size_t i = 0; i < scores.size();) {
    std::size_t j = i;
    double p = 0, n = 0;
    for (; j < scores.size() && scores[j].first == scores[i].first; ++j) {
      (scores[j].second ? p : n) += 1;
    }
    wins += p * (neg + n / 2);
    pos += p;
    neg += n;
    i = j;
  }
  if (pos == 0 || neg == 0) {
    return std::nullopt;
  }
  return wins / (pos * neg);
}

ClassificationCounts::ClassificationCounts(std::int64_t classes) : m_classes(classes)
{
  if (classes < 2 || classes > max_metric_classes) {
    throw UsageError("classification metrics need between 2 and {} classes; the model has {}", max_metric_classes,
                     classes);
  }
  m_confusion.assign(static_cast<std::size_t>(classes * classes), 0);
}

void
ClassificationCounts::add(std::span<const float> probabilities, std::span<const std::int64_t> labels)
{
  const auto c = static_cast<std::size_t>(m_classes);
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const auto row = probabilities.subspan(i * c, c);
    // A NaN would make the prediction arbitrary and the AUC's sort undefined.
    if (!std::all_of(row.begin(), row.end(), [](float p) { return std::isfinite(p); })) {
      throw Error("the model gave class probabilities that are not finite numbers (NaN or infinity)");
    }
    const auto predicted = static_cast<std::size_t>(std::max_element(row.begin(), row.end()) - row.begin());
    const auto label = static_cast<std::size_t>(labels[i]);
    ++m_confusion.at(label * c + predicted);
    if (m_classes == 2) {
      m_scores.emplace_back(row[1], label == 1);
    }
  }
  m_samples += labels.size();
}

void
ClassificationCounts::merge(const ClassificationCounts& other)
{
  if (other.m_classes != m_classes) {
    throw Error("cannot pool the counts of {} classes with those of {}", other.m_classes, m_classes);
  }
  for (std::size_t k = 0; k < m_confusion.size(); ++k) {
    m_confusion[k] += other.m_confusion[k];
  }
  m_samples += other.m_samples;
  m_scores.clear();
  m_auc.reset();
}

json
ClassificationCounts::to_counts() const
{
  json auc = nullptr;
  if (m_classes == 2) {
    const auto a = m_auc ? m_auc : roc_auc(m_scores);
    auc = a ? json(*a) : json(nullptr);
  }
  return {{"classes", m_classes}, {"confusion", m_confusion}, {"roc_auc", auc}};
}

ClassificationCounts
ClassificationCounts::from_counts(const json& j, std::uint64_t samples, const std::string& what)
{
  const auto bad = [&](const char* why) { return Error("{}: classification counts {}", what, why); };
  if (!j.is_object() || !j.contains("classes") || !j["classes"].is_number_integer()) {
    throw bad("lack an integer \"classes\"");
  }
  const auto classes = j["classes"].get<std::int64_t>();
  if (classes < 2 || classes > max_metric_classes) {
    throw bad("have a class count out of range");
  }
  ClassificationCounts c(classes);
  const auto it = j.find("confusion");
  if (it == j.end() || !it->is_array() || it->size() != c.m_confusion.size()) {
    throw bad("lack a confusion matrix of classes x classes counts");
  }
  std::uint64_t total = 0;
  for (std::size_t k = 0; k < it->size(); ++k) {
    const auto& v = (*it)[k];
    if (!v.is_number_unsigned() || v.get<std::uint64_t>() > samples) {
      throw bad("have a count that is not a number of samples");
    }
    c.m_confusion[k] = v.get<std::uint64_t>();
    total += c.m_confusion[k];
  }
  if (total != samples) {
    throw bad("do not add up to the samples evaluated");
  }
  c.m_samples = samples;
  if (classes == 2) {
    const auto a = j.find("roc_auc");
    if (a != j.end() && !a->is_null()) {
      if (!a->is_number() || !(a->get<double>() >= 0 && a->get<double>() <= 1)) {
        throw bad("have a ROC AUC outside [0, 1]");
      }
      c.m_auc = a->get<double>();
    }
  }
  return c;
}

json
ClassificationCounts::metrics(std::int64_t per_class_limit) const
{
  const auto c = static_cast<std::size_t>(m_classes);
  json per_class = json::array();
  double f1_sum = 0, weighted = 0;
  std::size_t f1_count = 0;
  std::vector<std::uint64_t> row_sum(c, 0), col_sum(c, 0);
  for (std::size_t t = 0; t < c; ++t) {
    for (std::size_t p = 0; p < c; ++p) {
      row_sum[t] += m_confusion[t * c + p];
      col_sum[p] += m_confusion[t * c + p];
    }
  }
  for (std::size_t k = 0; k < c; ++k) {
    const auto tp = m_confusion[k * c + k];
    const json precision = ratio(tp, col_sum[k]);
    const json recall = ratio(tp, row_sum[k]);
    // 2TP / (2TP + FP + FN): the harmonic mean of precision and recall where both are defined, 0
    // for a class only in the labels or only in the predictions, none for a class in neither.
    const json f1 = row_sum[k] + col_sum[k] == 0
                      ? json(nullptr)
                      : json(2.0 * static_cast<double>(tp) / static_cast<double>(row_sum[k] + col_sum[k]));
    if (f1.is_number()) {
      f1_sum += f1.get<double>();
      weighted += f1.get<double>() * static_cast<double>(row_sum[k]);
      ++f1_count;
    }
    if (static_cast<std::int64_t>(k) < per_class_limit) {
      per_class.push_back(
        {{"class", k}, {"precision", precision}, {"recall", recall}, {"f1", f1}, {"support", row_sum[k]}});
    }
  }
  json out = {{"macro_f1", f1_count == 0 ? json(nullptr) : json(f1_sum / static_cast<double>(f1_count))},
              {"weighted_f1", m_samples == 0 ? json(nullptr) : json(weighted / static_cast<double>(m_samples))}};
  if (m_classes <= per_class_limit) {
    out["per_class"] = std::move(per_class);
  }
  if (m_classes == 2) {
    out["sensitivity"] = ratio(m_confusion[3], row_sum[1]);
    out["specificity"] = ratio(m_confusion[0], row_sum[0]);
    out["roc_auc"] = to_counts()["roc_auc"];
  }
  return out;
}

json
pool_site_evaluations(const json& site_metrics, std::uint64_t max_samples)
{
  double accuracy = 0, loss = 0;
  std::uint64_t samples = 0, sites = 0, classified = 0;
  std::optional<ClassificationCounts> pooled;
  if (!site_metrics.is_object()) {
    return nullptr;
  }
  for (const auto& [site, m] : site_metrics.items()) {
    if (!m.is_object() || !m.contains("eval_samples") || !m["eval_samples"].is_number_unsigned() ||
        !m.contains("eval_accuracy") || !m["eval_accuracy"].is_number() || !m.contains("eval_loss") ||
        !m["eval_loss"].is_number()) {
      continue;
    }
    const auto n = m["eval_samples"].get<std::uint64_t>();
    const auto a = m["eval_accuracy"].get<double>();
    const auto l = m["eval_loss"].get<double>();
    if (n == 0 || n > max_samples || !(a >= 0 && a <= 1) || !(l >= 0) || !std::isfinite(l)) {
      continue;
    }
    accuracy += a * static_cast<double>(n);
    loss += l * static_cast<double>(n);
    samples += n;
    ++sites;
    if (m.contains("eval_confusion") && m.contains("eval_classes") && m["eval_classes"].is_number_integer()) {
      try {
        const auto counts = ClassificationCounts::from_counts(
          {{"classes", m["eval_classes"]}, {"confusion", m["eval_confusion"]}}, n, site);
        if (!pooled) {
          pooled = counts;
        } else {
          pooled->merge(counts);
        }
        ++classified;
      } catch (const Error&) {
        // Counts that do not add up, or of another class count: left out of the pool.
      }
    }
  }
  if (sites == 0) {
    return nullptr;
  }
  const auto total = static_cast<double>(samples);
  json out = {{"accuracy", accuracy / total}, {"loss", loss / total}, {"samples", samples}, {"sites", sites}};
  if (pooled) {
    out.update(pooled->metrics());
    out.erase("roc_auc"); // each site's is in its metrics (eval_roc_auc); AUCs do not pool
    out["classification_sites"] = classified;
  }
  return out;
}

} // namespace fedl::core
