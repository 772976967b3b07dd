// SPDX-License-Identifier: Apache-2.0
// The walk of a TorchScript module's graphs (inspect.hpp). What is refused and why is data:
// torchscript-allow-list.txt, built into the backend. How a write is found: TorchScript's operator
// schemas annotate the arguments an operator writes (Tensor(a!)) and the outputs that alias an
// input (Tensor(a) -> Tensor(a)); the walk follows every value that is, or aliases, a parameter
// or buffer of the module (reading it with prim::GetAttr, through views, lists, calls and control
// flow) and refuses a write to one.
#include "backends/torch/inspect.hpp"

#include <caffe2/serialize/inline_container.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/script.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

namespace fedl::backends::torch_backend {

namespace {

using torch::jit::Node;
using torch::jit::Value;

const char* const k_allow_list_text =
#include "torchscript_allow_list.inc"
  ;

struct AllowList
{
  int version = 0;
  std::set<std::string> allowed;
  std::map<std::string, std::string> denied; // operator -> why
};

AllowList
parse_allow_list(const std::string& text)
{
  AllowList list;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    std::istringstream words(line);
    std::string word;
    if (!(words >> word) || word[0] == '#') {
      continue;
    }
    if (word == "version") {
      words >> list.version;
    } else if (word == "allow") {
      while (words >> word) {
        list.allowed.insert(word);
      }
    } else if (word == "deny") {
      std::string rest;
      std::getline(words, rest);
      const auto colon = rest.find(':', rest.find("::") + 2);
      const auto name = rest.substr(0, colon);
      const auto why = rest.substr(colon + 1);
      list.denied[name.substr(name.find_first_not_of(' '))] = why.substr(why.find_first_not_of(' '));
    }
  }
  if (list.version <= 0 || list.allowed.empty()) {
    throw std::logic_error("the built-in TorchScript allow-list has no version or no operator");
  }
  return list;
}

const AllowList&
allow_list()
{
  static const AllowList list = parse_allow_list(k_allow_list_text);
  return list;
}

// What a value is, as far as a write to it matters: ordered, the larger wins where values mix.
enum class Origin
{
  fresh,     // computed here, an input, a constant, an integer attribute (never part of an update)
  buffer,    // a floating-point buffer or tensor attribute: part of the update
  parameter, // a parameter: the update is made of them
};

struct Finding
{
  std::string op, method, source, reason;
  bool operator<(const Finding& o) const
  {
    return std::tie(op, method, source, reason) < std::tie(o.op, o.method, o.source, o.reason);
  }
};

bool
is_tensor(const c10::TypePtr& t)
{
  if (t->kind() == c10::TypeKind::OptionalType) {
    return is_tensor(t->expectRef<c10::OptionalType>().getElementType());
  }
  return t->kind() == c10::TypeKind::TensorType;
}

// Where a node came from: the module's own source file and line where the archive kept them
// (torch.jit.save does, with its debug records), else the line of the archive's code.
std::string
source_of(const Node* n)
{
  auto range = n->sourceRange();
  if (auto original = range.findSourceRangeThatGenerated()) {
    range = *original;
  }
  if (auto at = range.file_line_col()) {
    return std::get<0>(*at) + ":" + std::to_string(std::get<1>(*at)) + ":" + std::to_string(std::get<2>(*at));
  }
  return "";
}

// The state of one function's walk: each value's origin, the attribute it names (for messages)
// and, for a module, the instance it is (to tell a buffer from a counter, and to follow calls).
struct Frame
{
  std::string method;
  std::unordered_map<const Value*, Origin> origin;
  std::unordered_map<const Value*, std::string> name;
  std::unordered_map<const Value*, torch::jit::Module> modules;
  bool first_pass = true; // a loop's body is walked again until its origins settle

  Origin of(const Value* v) const
  {
    const auto it = origin.find(v);
    return it == origin.end() ? Origin::fresh : it->second;
  }
  std::string name_of(const Value* v) const
  {
    const auto it = name.find(v);
    return it == name.end() ? std::string("of the module") : it->second;
  }
  void set(const Value* v, Origin o, const std::string& from = {})
  {
    auto& slot = origin[v];
    if (o >= slot) {
      slot = o;
      if (!from.empty() && o != Origin::fresh) {
        name[v] = from;
      }
    }
  }
};

class Walker
{
public:
  void module_tree(const torch::jit::Module& m)
  {
    const auto type = m.type();
    for (auto* fn : type->methods()) {
      walk_function(*fn, {}, Self{m});
    }
    for (auto* fn : type->getForwardHooks()) {
      walk_function(*fn, {}, Self{m});
    }
    for (auto* fn : type->getForwardPreHooks()) {
      walk_function(*fn, {}, Self{m});
    }
    for (const auto& child : m.named_children()) {
      module_tree(child.value);
    }
  }

  nlohmann::json findings_json() const
  {
    auto list = [](const std::vector<Finding>& found) {
      auto out = nlohmann::json::array();
      for (const auto& f : found) {
        out.push_back({{"operator", f.op}, {"method", f.method}, {"source", f.source}, {"reason", f.reason}});
      }
      return out;
    };
    nlohmann::json j;
    j["refused"] = list(m_refused);
    j["needs_dp_off"] = list(m_dp);
    j["operators"] = m_ops;
    j["methods"] = m_methods;
    return j;
  }

  void refuse(const Node* n, const Frame& f, std::string why)
  {
    add(m_refused, {n->kind().toQualString(), f.method, source_of(n), std::move(why)});
  }

private:
  // An argument as the caller knows it: what it is, and its name in messages.
  struct Arg
  {
    Origin origin;
    std::string name;
  };
  // A method's first input: its object, and the module instance it is if the walk knows it.
  struct Self
  {
    std::optional<torch::jit::Module> module;
  };

  // Walks `fn` with its arguments' origins (a method's after its object); the largest origin of
  // what it returns.
  Origin walk_function(torch::jit::Function& fn, const std::vector<Arg>& args, const std::optional<Self>& self)
  {
    if (!fn.isGraphFunction()) {
      return Origin::fresh; // a builtin: its schema is checked where it is called
    }
    std::string key = fn.qualname().qualifiedName();
    for (const auto& a : args) {
      key += "," + std::to_string(static_cast<int>(a.origin)) + (a.origin == Origin::fresh ? "" : a.name);
    }
    if (self && self->module) {
      key += "@" + std::to_string(reinterpret_cast<std::uintptr_t>(self->module->_ivalue().get()));
    }
    if (const auto it = m_done.find(key); it != m_done.end()) {
      return it->second;
    }
    m_done[key] = Origin::fresh; // a recursive call sees no origin yet (TorchScript has none)
    const auto graph = torch::jit::toGraphFunction(fn).graph();
    Frame f;
    f.method = fn.qualname().qualifiedName();
    if (std::find(m_methods.begin(), m_methods.end(), f.method) == m_methods.end()) {
      m_methods.push_back(f.method);
    }
    const auto inputs = graph->inputs();
    for (std::size_t i = 0; i < inputs.size(); ++i) {
      if (i == 0 && self) {
        if (self->module) {
          f.modules.emplace(inputs[0], *self->module);
        }
      } else if (const std::size_t a = self ? i - 1 : i; a < args.size()) {
        f.set(inputs[i], args[a].origin, args[a].name);
      }
    }
    walk_block(graph->block(), f);
    Origin out = Origin::fresh;
    for (const auto* r : graph->outputs()) {
      out = std::max(out, f.of(r));
    }
    m_done[key] = out;
    return out;
  }

  void walk_block(torch::jit::Block* b, Frame& f)
  {
    for (auto* n : b->nodes()) {
      walk_node(n, f);
    }
  }

  void walk_node(Node* n, Frame& f)
  {
    const std::string op = n->kind().toQualString();
    if (f.first_pass) {
      ++m_ops[op];
    }
    check_listed(n, op, f);
    if (n->kind() == c10::prim::If) {
      for (auto* b : n->blocks()) {
        walk_block(b, f);
        join_outputs(n, b, f);
      }
      return;
    }
    if (n->kind() == c10::prim::Loop) {
      walk_loop(n, f);
      return;
    }
    if (n->kind() == c10::prim::GetAttr) {
      get_attr(n, f);
      return;
    }
    if (n->kind() == c10::prim::SetAttr) {
      if (is_tensor(n->input(1)->type())) {
        refuse(n, f, "replaces the tensor " + n->s(c10::attr::name) + " of the module");
      }
      return;
    }
    if (n->kind() == c10::prim::CallMethod || n->kind() == c10::prim::CallFunction) {
      call(n, f);
      return;
    }
    check_writes(n, f);
    propagate(n, f);
  }

  void check_listed(const Node* n, const std::string& op, const Frame& f)
  {
    const auto& list = allow_list();
    const std::string ns = n->kind().ns().toUnqualString();
    if (ns != "aten" && ns != "prim") {
      refuse(n, f,
             "an operator of the " + ns +
               " namespace: not one of PyTorch's own (a library's torch.ops or a custom class)");
    } else if (const auto it = list.denied.find(op); it != list.denied.end()) {
      refuse(n, f, it->second);
    } else if (list.allowed.count(op) == 0) {
      refuse(n, f, "not in fedl's allow-list (version " + std::to_string(list.version) + ")");
    }
  }

  static void join_outputs(const Node* n, torch::jit::Block* b, Frame& f)
  {
    const auto outs = b->outputs();
    for (std::size_t i = 0; i < outs.size() && i < n->outputs().size(); ++i) {
      f.set(n->outputs()[i], f.of(outs[i]), f.name_of(outs[i]));
    }
  }

  // A loop's carried values (inputs 2.. of the node, inputs 1.. of its body) take what the body
  // makes of them, so the body is walked until their origins stop growing.
  void walk_loop(Node* n, Frame& f)
  {
    auto* body = n->blocks()[0];
    const bool first = f.first_pass;
    for (int pass = 0; pass < 5; ++pass) {
      bool grew = false;
      for (std::size_t i = 2; i < n->inputs().size(); ++i) {
        const auto* carried = body->inputs()[i - 1];
        const auto before = f.of(carried);
        f.set(carried, f.of(n->inputs()[i]), f.name_of(n->inputs()[i]));
        f.set(carried, f.of(body->outputs()[i - 1]), f.name_of(body->outputs()[i - 1]));
        grew = grew || f.of(carried) != before;
      }
      if (pass > 0 && !grew) {
        break;
      }
      walk_block(body, f);
      f.first_pass = false;
    }
    f.first_pass = first;
    for (std::size_t i = 0; i < n->outputs().size(); ++i) {
      f.set(n->outputs()[i], f.of(body->outputs()[i + 1]), f.name_of(body->outputs()[i + 1]));
      f.set(n->outputs()[i], f.of(n->inputs()[i + 2]), f.name_of(n->inputs()[i + 2]));
    }
  }

  static void get_attr(const Node* n, Frame& f)
  {
    const auto* object = n->input(0);
    const auto* out = n->output();
    const auto& field = n->s(c10::attr::name);
    const auto type = object->type()->cast<c10::ClassType>();
    const auto owner = f.modules.find(object);
    const auto named = f.name.find(object);
    const std::string path = named == f.name.end() ? field : named->second + "." + field;
    if (owner != f.modules.end() && out->type()->cast<c10::ClassType>() &&
        out->type()->expectRef<c10::ClassType>().is_module()) {
      f.modules.emplace(out, owner->second.attr(field).toModule());
      f.name[out] = path;
      return;
    }
    if (!type || !is_tensor(out->type())) {
      f.set(out, f.of(object), f.name_of(object));
      return;
    }
    const auto slot = type->findAttributeSlot(field);
    if (slot && type->is_module() && type->is_parameter(*slot)) {
      f.set(out, Origin::parameter, path);
      return;
    }
    if (owner != f.modules.end()) {
      // An integer buffer (a counter such as num_batches_tracked) never leaves in an update.
      const auto value = owner->second.attr(field);
      if (value.isTensor() && !value.toTensor().is_floating_point()) {
        return;
      }
    }
    f.set(out, Origin::buffer, path);
  }

  // A call: the callee is walked with what its arguments are, and what it returns is what its
  // own walk found (an alias of an argument it returns is found there).
  void call(Node* n, Frame& f)
  {
    std::vector<Arg> args;
    for (std::size_t i = 1; i < n->inputs().size(); ++i) {
      args.push_back({f.of(n->input(i)), f.name_of(n->input(i))});
    }
    Origin back = Origin::fresh;
    if (n->kind() == c10::prim::CallMethod) {
      const auto type = n->input(0)->type()->expect<c10::ClassType>();
      const auto object = f.modules.find(n->input(0));
      back = walk_function(type->getMethod(n->s(c10::attr::name)), args,
                           Self{object == f.modules.end() ? std::nullopt : std::optional(object->second)});
    } else {
      auto* fn = n->input(0)->type()->expectRef<c10::FunctionType>().function();
      back = walk_function(*fn, args, std::nullopt);
    }
    for (auto* out : n->outputs()) {
      f.set(out, back, "returned by " + f.method);
    }
  }

  // Arguments that the schema marks as written (Tensor(a!)), and the running statistics that
  // batch_norm and instance_norm update without saying so in their schema.
  void check_writes(const Node* n, const Frame& f)
  {
    std::vector<std::size_t> written;
    if (n->kind() == c10::aten::batch_norm || n->kind() == c10::aten::instance_norm) {
      for (const std::size_t i : {std::size_t{3}, std::size_t{4}}) {
        const auto* v = n->input(i);
        if (f.of(v) == Origin::buffer) {
          add(m_dp, {n->kind().toQualString(), f.method, source_of(n),
                     "updates the running statistics " + f.name_of(v) + " from the data, without noise"});
        } else if (f.of(v) == Origin::parameter) {
          written.push_back(i);
        }
      }
    }
    if (const auto* schema = n->maybeSchema()) {
      const auto& arguments = schema->arguments();
      for (std::size_t i = 0; i < arguments.size() && i < n->inputs().size(); ++i) {
        const auto* info = arguments[i].alias_info();
        if (info != nullptr && info->isWrite()) {
          written.push_back(i);
        }
      }
    }
    for (const auto i : written) {
      const auto* v = n->input(i);
      if (!is_tensor(v->type())) {
        continue;
      }
      if (f.of(v) == Origin::parameter) {
        refuse(n, f,
               "writes the parameter " + f.name_of(v) +
                 " in place: an update would carry whatever was put there, past DP-SGD's clipping and noise");
      } else if (f.of(v) == Origin::buffer) {
        refuse(n, f,
               "writes the buffer " + f.name_of(v) +
                 " in place (only a normalisation layer's running statistics may change, and only without DP-SGD)");
      }
    }
  }

  // What the outputs alias: per the schema, the inputs whose alias set they share; without a
  // schema (prim operators), any input.
  static void propagate(const Node* n, Frame& f)
  {
    if (n->kind() == c10::prim::Constant) {
      return;
    }
    const auto* schema = n->maybeSchema();
    Origin any = Origin::fresh;
    const Value* widest = nullptr;
    for (const auto* in : n->inputs()) {
      if (f.of(in) >= any) {
        any = f.of(in);
        widest = in;
      }
    }
    if (any == Origin::fresh) {
      return;
    }
    for (std::size_t k = 0; k < n->outputs().size(); ++k) {
      const auto* out = n->outputs()[k];
      if (schema == nullptr || k >= schema->returns().size()) {
        f.set(out, any, f.name_of(widest));
        continue;
      }
      const auto* info = schema->returns()[k].alias_info();
      if (info == nullptr) {
        continue;
      }
      for (std::size_t i = 0; i < schema->arguments().size() && i < n->inputs().size(); ++i) {
        const auto* arg = schema->arguments()[i].alias_info();
        // A wildcard output may alias any input, annotated or not.
        const bool shares =
          info->isWildcardBefore() ||
          (arg != nullptr &&
           (arg->isWildcardBefore() || std::any_of(info->beforeSets().begin(), info->beforeSets().end(),
                                                   [&](const auto& s) { return arg->beforeSets().count(s) > 0; })));
        if (shares) {
          f.set(out, f.of(n->input(i)), f.name_of(n->input(i)));
        }
      }
    }
  }

  // Each finding once, in the order the walk met them (the first is what a refusal names).
  void add(std::vector<Finding>& list, Finding f)
  {
    if (m_seen.insert(f).second) {
      list.push_back(std::move(f));
    }
  }

  std::map<std::string, Origin> m_done;
  std::vector<Finding> m_refused, m_dp;
  std::set<Finding> m_seen;
  std::map<std::string, int> m_ops;
  std::vector<std::string> m_methods;
};

// The archive's code, read before torch.jit.load runs or compiles any of it: a definition or call
// of __setstate__ (which loading would run), and operators of a namespace other than PyTorch's
// own (torch.ops.NS.op, which the code spells ops.NS.op): each as a refusal.
nlohmann::json
archive_findings(std::istream& archive)
{
  caffe2::serialize::PyTorchStreamReader reader(&archive);
  auto found = nlohmann::json::array();
  for (const auto& name : reader.getAllRecords()) {
    if (name.rfind("code/", 0) != 0 || name.size() < 3 || name.compare(name.size() - 3, 3, ".py") != 0) {
      continue;
    }
    const auto [data, size] = reader.getRecord(name);
    const std::string_view text(static_cast<const char*>(data.get()), size);
    if (text.find("__setstate__") != std::string_view::npos) {
      found.push_back({{"operator", "__setstate__"},
                       {"method", "the module's loading"},
                       {"source", name},
                       {"reason", "code that torch.jit.load would run while loading the module, before anything "
                                  "of it can be checked"}});
    }
    std::set<std::string> spaces;
    for (auto at = text.find("ops."); at != std::string_view::npos; at = text.find("ops.", at + 4)) {
      if (at > 0 && (std::isalnum(static_cast<unsigned char>(text[at - 1])) != 0 || text[at - 1] == '_')) {
        continue; // part of a longer name
      }
      auto end = at + 4;
      while (end < text.size() && (std::isalnum(static_cast<unsigned char>(text[end])) != 0 || text[end] == '_')) {
        ++end;
      }
      const std::string space(text.substr(at + 4, end - at - 4));
      if (end < text.size() && text[end] == '.' && space != "aten" && space != "prim" && spaces.insert(space).second) {
        found.push_back({{"operator", space + "::"},
                         {"method", "the module's code"},
                         {"source", name},
                         {"reason", "an operator of the " + space + " namespace (torch.ops." + space +
                                      "): not one of PyTorch's own (a library's, or a custom class)"}});
      }
    }
  }
  return found;
}

// Torch's own names (torch.float32), not c10's ("Float").
std::string
dtype_name(c10::ScalarType t)
{
  switch (t) {
  case c10::ScalarType::Float:
    return "float32";
  case c10::ScalarType::Double:
    return "float64";
  case c10::ScalarType::Half:
    return "float16";
  case c10::ScalarType::BFloat16:
    return "bfloat16";
  case c10::ScalarType::Long:
    return "int64";
  case c10::ScalarType::Int:
    return "int32";
  case c10::ScalarType::Short:
    return "int16";
  case c10::ScalarType::Char:
    return "int8";
  case c10::ScalarType::Byte:
    return "uint8";
  case c10::ScalarType::Bool:
    return "bool";
  default:
    return c10::toString(t);
  }
}

nlohmann::json
tensors_json(const torch::jit::Module& m, bool parameters)
{
  auto out = nlohmann::json::array();
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    out.push_back({{"name", name}, {"shape", t.sizes().vec()}, {"dtype", dtype_name(t.scalar_type())}});
  };
  if (parameters) {
    for (const auto& p : m.named_parameters(true)) {
      add(p.name, p.value);
    }
  } else {
    for (const auto& b : m.named_buffers(true)) {
      add(b.name, b.value);
    }
  }
  return out;
}

} // namespace

std::string
inspect_torchscript(const std::string& path)
{
  std::ifstream file(path, std::ios::binary);
  if (!file) {
    throw std::runtime_error("cannot read " + path);
  }
  std::stringstream bytes;
  bytes << file.rdbuf();
  nlohmann::json report;
  report["format"] = "torchscript";
  report["allow_list_version"] = allow_list().version;
  auto early = archive_findings(bytes);
  if (!early.empty()) {
    report["verdict"] = "refused";
    report["refused"] = std::move(early);
    for (const char* empty : {"needs_dp_off", "methods", "parameters", "buffers"}) {
      report[empty] = nlohmann::json::array();
    }
    report["operators"] = nlohmann::json::object();
    return report.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  }
  bytes.clear();
  bytes.seekg(0);
  const auto module = torch::jit::load(bytes, torch::kCPU);
  Walker walker;
  walker.module_tree(module);
  report.update(walker.findings_json());
  report["parameters"] = tensors_json(module, true);
  report["buffers"] = tensors_json(module, false);
  report["verdict"] = report["refused"].empty() ? "allowed" : "refused";
  return report.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

} // namespace fedl::backends::torch_backend
